//! Task creation: the `create_tasks` calls of many threads committed together in groups.

use super::client::{is_transient, ClientRetry};
use super::listen::STEPS_READY;
use super::{db, ms};
use crate::backend::{CreatedReply, Notification, NotificationSender};
use crate::error::EngineError;
use crate::template::TaskTemplate;
use serde_json::Value;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::mpsc::UnboundedReceiver;
use uuid::Uuid;

/// The most tasks one creation transaction takes from the callers waiting for one.
pub(super) const CREATE_GROUP_TASKS: usize = 10_000;

/// One `create_tasks` call, waiting for its tasks to be committed.
pub(super) struct CreateRequest {
    pub(super) rows: NewTaskRows,
    pub(super) reply: CreatedReply,
}

/// The rows of new tasks: one call's, or a group's (appended), inserted with three statements
/// whatever their number or templates.
#[derive(Default)]
pub(super) struct NewTaskRows {
    pub(super) task_uuids: Vec<Uuid>,
    pub(super) contexts: Vec<Value>,
    pub(super) namespaces: Vec<String>,
    pub(super) names: Vec<String>,
    pub(super) versions: Vec<String>,
    pub(super) step_counts: Vec<i32>,
    pub(super) step_uuids: Vec<Uuid>,
    pub(super) step_tasks: Vec<Uuid>,
    pub(super) step_indices: Vec<i32>,
    pub(super) step_names: Vec<String>,
    pub(super) step_waiting: Vec<i32>,
    /// When each step's task may start (seconds since the epoch; `None`: now).
    pub(super) step_run_at: Vec<Option<f64>>,
    pub(super) root_uuids: Vec<Uuid>,
    pub(super) root_tasks: Vec<Uuid>,
    pub(super) root_namespaces: Vec<String>,
    pub(super) root_timeouts: Vec<i32>,
    pub(super) root_run_at: Vec<Option<f64>>,
}

impl NewTaskRows {
    /// One task per context of `template`, each with uuids of its own (chosen here, so that a
    /// retried transaction can tell whether an earlier try committed).
    pub(super) fn new(
        template: &TaskTemplate,
        contexts: Vec<Value>,
        run_at: Option<SystemTime>,
    ) -> Self {
        // Seconds since the epoch, compared with the database's clock: a scheduled root step is
        // `pending` and hidden in the ready table until then, exactly as a step waiting out a
        // backoff, so every claim path (polling, NOTIFY, EventDriven's wake) already honours it.
        let run_at: Option<f64> = run_at.map(|t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        });
        let n = template.steps.len();
        let roots: Vec<usize> = (0..n)
            .filter(|&i| template.dependencies[i].is_empty())
            .collect();
        let tasks = contexts.len();
        let mut rows = Self {
            task_uuids: Vec::with_capacity(tasks),
            namespaces: vec![template.namespace.clone(); tasks],
            names: vec![template.name.clone(); tasks],
            versions: vec![template.version.clone(); tasks],
            step_counts: vec![n as i32; tasks],
            step_uuids: Vec::with_capacity(tasks * n),
            step_tasks: Vec::with_capacity(tasks * n),
            step_indices: Vec::with_capacity(tasks * n),
            step_names: Vec::with_capacity(tasks * n),
            step_waiting: Vec::with_capacity(tasks * n),
            step_run_at: vec![run_at; tasks * n],
            root_uuids: Vec::with_capacity(tasks * roots.len()),
            root_tasks: Vec::with_capacity(tasks * roots.len()),
            root_namespaces: Vec::with_capacity(tasks * roots.len()),
            root_timeouts: Vec::with_capacity(tasks * roots.len()),
            root_run_at: vec![run_at; tasks * roots.len()],
            contexts,
        };
        for _ in 0..tasks {
            let task_uuid = Uuid::new_v4();
            rows.task_uuids.push(task_uuid);
            let first = rows.step_uuids.len();
            for (i, step) in template.steps.iter().enumerate() {
                rows.step_uuids.push(Uuid::new_v4());
                rows.step_tasks.push(task_uuid);
                rows.step_indices.push(i as i32);
                rows.step_names.push(step.name.to_string());
                rows.step_waiting
                    .push(template.dependencies[i].len() as i32);
            }
            for &i in &roots {
                rows.root_uuids.push(rows.step_uuids[first + i]);
                rows.root_tasks.push(task_uuid);
                rows.root_namespaces
                    .push(template.steps[i].namespace.clone());
                rows.root_timeouts.push(ms(template.steps[i].timeout));
            }
        }
        rows
    }

    pub(super) fn append(&mut self, other: &Self) {
        self.task_uuids.extend_from_slice(&other.task_uuids);
        self.contexts.extend_from_slice(&other.contexts);
        self.namespaces.extend_from_slice(&other.namespaces);
        self.names.extend_from_slice(&other.names);
        self.versions.extend_from_slice(&other.versions);
        self.step_counts.extend_from_slice(&other.step_counts);
        self.step_uuids.extend_from_slice(&other.step_uuids);
        self.step_tasks.extend_from_slice(&other.step_tasks);
        self.step_indices.extend_from_slice(&other.step_indices);
        self.step_names.extend_from_slice(&other.step_names);
        self.step_waiting.extend_from_slice(&other.step_waiting);
        self.step_run_at.extend_from_slice(&other.step_run_at);
        self.root_uuids.extend_from_slice(&other.root_uuids);
        self.root_tasks.extend_from_slice(&other.root_tasks);
        self.root_namespaces
            .extend_from_slice(&other.root_namespaces);
        self.root_timeouts.extend_from_slice(&other.root_timeouts);
        self.root_run_at.extend_from_slice(&other.root_run_at);
    }
}

/// Creates tasks off the engine loop, in groups: every call waiting when a transaction starts
/// shares it, so that callers on many threads pay one commit (one WAL flush) between them. Each
/// caller is answered once its tasks are committed. A group that the database refuses for a
/// value (not the connection) is split, so that the call that brought the value fails alone.
pub(super) async fn create_in_groups(
    pool: PgPool,
    mut requests: UnboundedReceiver<CreateRequest>,
    wake: NotificationSender,
    transactions: usize,
) {
    // Up to `transactions` groups commit at once: while they wait for their commits, the next
    // callers gather into the next group (and PostgreSQL flushes concurrent commits together).
    let running = Arc::new(tokio::sync::Semaphore::new(transactions));
    while let Some(first) = requests.recv().await {
        let Ok(permit) = Arc::clone(&running).acquire_owned().await else {
            break;
        };
        let mut tasks = first.rows.task_uuids.len();
        let mut group = vec![first];
        while tasks < CREATE_GROUP_TASKS {
            match requests.try_recv() {
                Ok(request) => {
                    tasks += request.rows.task_uuids.len();
                    group.push(request);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        let wake = wake.clone();
        tokio::spawn(async move {
            create_group(&pool, group).await;
            // Our own enqueues: a claim may find them.
            let _ = wake.send(Notification::StepsReady);
            drop(permit);
        });
    }
    // Every group started is answered before the engine stops.
    let _ = running.acquire_many(transactions as u32).await;
}

/// Commit one group of calls, and answer each.
pub(super) async fn create_group(pool: &PgPool, group: Vec<CreateRequest>) {
    if group.len() == 1 {
        let result = insert_tasks(pool, &group[0].rows).await;
        answer_create(&group[0], result);
        return;
    }
    let mut all = NewTaskRows::default();
    for request in &group {
        all.append(&request.rows);
    }
    match insert_tasks(pool, &all).await {
        Err(e) if !is_transient(&e) => {
            for request in &group {
                let result = insert_tasks(pool, &request.rows).await;
                answer_create(request, result);
            }
        }
        result => {
            let result = result.map_err(Arc::new);
            for request in &group {
                let _ = request.reply.try_send(match &result {
                    Ok(()) => Ok(request.rows.task_uuids.clone()),
                    Err(e) => Err(EngineError::Backend {
                        context: "postgres".into(),
                        source: Arc::clone(e),
                    }),
                });
            }
        }
    }
}

pub(super) fn answer_create(request: &CreateRequest, result: Result<(), sqlx::Error>) {
    let _ = request
        .reply
        .try_send(result.map(|()| request.rows.task_uuids.clone()).map_err(db));
}

/// Insert `rows` in one statement (one transaction). A connection the server closed (a terminated session, a
/// restart) fails the transaction before anything is written, and it is tried again. A failure
/// at COMMIT leaves the outcome unknown: the next try first looks for the tasks (their uuids were
/// chosen beforehand), so a task is never created twice.
pub(super) async fn insert_tasks(pool: &PgPool, rows: &NewTaskRows) -> Result<(), sqlx::Error> {
    let mut retry = ClientRetry::new();
    let mut look_first = false;
    loop {
        let attempt = async {
            if look_first && tasks_exist(pool, &rows.task_uuids).await? {
                return Ok(());
            }
            // One statement, so one round trip and its own transaction (autocommit): the rows of
            // a sibling CTE are there for the foreign-key checks, which run at its end, and the
            // NOTIFY goes out at its commit.
            sqlx::query(
                "WITH tasks AS (
                   INSERT INTO tasker_tasks (task_uuid, namespace, name, version, context, status, incomplete_steps)
                   SELECT u, ns, nm, v, c, 'pending', n
                   FROM unnest($1::uuid[], $2::jsonb[], $3::text[], $4::text[], $5::text[], $6::int4[])
                        AS x(u, c, ns, nm, v, n)
                 ), steps AS (
                   INSERT INTO tasker_steps (step_uuid, task_uuid, step_index, name, status, waiting_on, ready_at)
                   SELECT u, t, i, nm,
                          CASE WHEN w = 0 AND coalesce(to_timestamp(ra) <= now(), true) THEN 'enqueued'
                               ELSE 'pending' END, w,
                          CASE WHEN w = 0 THEN greatest(now(), coalesce(to_timestamp(ra), now())) END
                   FROM unnest($7::uuid[], $8::uuid[], $9::int4[], $10::text[], $11::int4[], $12::float8[])
                        AS x(u, t, i, nm, w, ra)
                 ), ready AS (
                   INSERT INTO tasker_ready_steps (step_uuid, task_uuid, namespace, timeout_ms, visible_at)
                   SELECT u, t, ns, ms, greatest(now(), coalesce(to_timestamp(ra), now()))
                   FROM unnest($13::uuid[], $14::uuid[], $15::text[], $16::int4[], $17::float8[])
                        AS x(u, t, ns, ms, ra)
                 )
                 SELECT pg_notify($18, '')",
            )
            .bind(&rows.task_uuids)
            .bind(&rows.contexts)
            .bind(&rows.namespaces)
            .bind(&rows.names)
            .bind(&rows.versions)
            .bind(&rows.step_counts)
            .bind(&rows.step_uuids)
            .bind(&rows.step_tasks)
            .bind(&rows.step_indices)
            .bind(&rows.step_names)
            .bind(&rows.step_waiting)
            .bind(&rows.step_run_at)
            .bind(&rows.root_uuids)
            .bind(&rows.root_tasks)
            .bind(&rows.root_namespaces)
            .bind(&rows.root_timeouts)
            .bind(&rows.root_run_at)
            .bind(STEPS_READY)
            .execute(pool)
            .await
            .map(|_| ())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if retry.again(&e, "creating tasks").await => look_first = true,
            Err(e) => return Err(e),
        }
    }
}

/// Whether the tasks of one `create_tasks` transaction were committed (all or none were).
pub(super) async fn tasks_exist(pool: &PgPool, task_uuids: &[Uuid]) -> Result<bool, sqlx::Error> {
    let Some(first) = task_uuids.first() else {
        return Ok(false);
    };
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tasker_tasks WHERE task_uuid = $1)")
        .bind(first)
        .fetch_one(pool)
        .await
}
