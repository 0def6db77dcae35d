//! The durable backend: many worker processes on many hosts share one PostgreSQL database.
//!
//! - Ready steps live in a small hot table (`tasker_ready_steps`). Claims take them with
//!   `FOR UPDATE SKIP LOCKED` and push `visible_at` forward by the step's timeout: a step whose
//!   worker died becomes claimable again once its claim is that old, and the next claim counts
//!   a new attempt.
//! - Recording a batch of outcomes is one transaction: results, retries, successors made ready,
//!   task completion, then a claim of what this worker has room for (often the successors just
//!   made ready), so an engine loop costs one commit. Every write is conditioned on the attempt
//!   number, so a stale completion (its step was reclaimed meanwhile) changes nothing: each
//!   step's final result is recorded exactly once.
//! - A worker holds at most `max_in_flight` claimed steps (twice its handler threads): a claimed
//!   step's deadline runs from the claim, so it must not wait long for a free thread.
//! - Wake-ups: LISTEN/NOTIFY (EventDriven), a periodic claim (Polling), or both (Hybrid). One
//!   NOTIFY per transaction at most, and only for steps the sender did not claim itself.
//!   EventDriven workers also wake when the earliest hidden row becomes visible (a retry's
//!   backoff, an expired claim), and every mode claims once at start.

use super::{Backend, Notification, SnapshotReply};
use crate::config::DeploymentMode;
use crate::engine::EngineMessage;
use crate::error::{EngineError, EngineResult};
use crate::events::{
    AttemptOutcome, InFlight, StepExecutionEvent, StepSnapshot, StepStatus, TaskInfo, TaskSnapshot,
    TaskStatus,
};
use crate::template::{TaskTemplate, TemplateKey, TemplateRegistry};
use serde_json::Value;
use sqlx::postgres::{PgListener, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};
use uuid::Uuid;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const STEPS_READY: &str = "tasker_steps_ready";
const TASKS_FINISHED: &str = "tasker_tasks_finished";
/// How long a failed write waits before it is tried again (the database may be restarting).
const RETRY_WRITE_AFTER: Duration = Duration::from_millis(250);
/// How often waiters and old rows are checked when nothing else wakes the engine.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
const CLEANUP_EVERY: Duration = Duration::from_secs(60);

pub struct PostgresSettings {
    pub url: String,
    pub pool_size: u32,
    pub worker_id: String,
    pub namespaces: Vec<String>,
    pub mode: DeploymentMode,
    pub poll_interval: Duration,
    pub finished_task_ttl: Duration,
    /// Most attempts claimed and not yet recorded or released (running or queued for Ruby).
    /// A claimed step's visibility deadline runs from the claim: steps must not wait in this
    /// process longer than they take to run, or they time out (and reappear elsewhere) unstarted.
    pub max_in_flight: usize,
}

pub struct PostgresBackend {
    settings: PostgresSettings,
    local: Arc<TemplateRegistry>,
    pool: Option<PgPool>,
    /// Templates by key: local ones, and others loaded from the database on first use.
    templates: HashMap<TemplateKey, Arc<TaskTemplate>>,
    /// Whether a claim may find something (set by notifications, polls, our own enqueues).
    maybe_ready: bool,
    next_poll: Option<Instant>,
    waiters: HashMap<Uuid, Vec<SnapshotReply>>,
    /// Outcomes whose transaction failed: kept and written again, never dropped.
    unrecorded: Vec<(InFlight, AttemptOutcome)>,
    retry_write_at: Option<Instant>,
    next_housekeeping: Instant,
    next_cleanup: Instant,
    /// Attempts claimed here and not yet recorded or released (`prefetched` included).
    outstanding: usize,
    /// Claimed in a record transaction, not yet handed to the engine.
    prefetched: Vec<PgRow>,
    /// The worker is shutting down: claim nothing more.
    stopping: bool,
    /// The template of each attempt claimed here and not yet recorded (by step), so recording
    /// it needs no lookup.
    flight_templates: HashMap<Uuid, Arc<TaskTemplate>>,
    /// A claim due without any notification: at start (steps may already be waiting), and in
    /// EventDriven mode when the earliest hidden row becomes visible (a retry's backoff ends, the
    /// claim of a worker that died expires). Not a poll: a wake-up at a time the table names.
    wake_claim_at: Option<Instant>,
}

impl PostgresBackend {
    pub fn new(settings: PostgresSettings, local: Arc<TemplateRegistry>) -> Self {
        let templates = local.iter().map(|t| (t.key(), Arc::clone(t))).collect();
        let cleanup_every = cleanup_every(settings.finished_task_ttl);
        Self {
            settings,
            local,
            pool: None,
            templates,
            maybe_ready: true,
            next_poll: None,
            waiters: HashMap::new(),
            unrecorded: Vec::new(),
            retry_write_at: None,
            next_housekeeping: Instant::now() + HOUSEKEEPING_EVERY,
            next_cleanup: Instant::now() + cleanup_every,
            outstanding: 0,
            prefetched: Vec::new(),
            stopping: false,
            flight_templates: HashMap::new(),
            wake_claim_at: Some(Instant::now()),
        }
    }

    fn pool(&self) -> EngineResult<&PgPool> {
        self.pool
            .as_ref()
            .ok_or_else(|| EngineError::Internal("postgres backend used before start".into()))
    }

    fn polls(&self) -> bool {
        self.settings.mode != DeploymentMode::EventDriven
    }

    fn listens(&self) -> bool {
        self.settings.mode != DeploymentMode::Polling
    }

    async fn template(&mut self, key: &TemplateKey) -> EngineResult<Arc<TaskTemplate>> {
        if let Some(t) = self.templates.get(key) {
            return Ok(Arc::clone(t));
        }
        let row = sqlx::query("SELECT yaml, source FROM tasker_templates WHERE namespace = $1 AND name = $2 AND version = $3")
            .bind(&key.namespace)
            .bind(&key.name)
            .bind(&key.version)
            .fetch_optional(self.pool()?)
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Err(EngineError::config(format!(
                "unknown template {key} (not loaded here and not stored in the database; loaded here: {})",
                self.local.describe_known()
            )));
        };
        let yaml: String = row.get("yaml");
        let source: String = row.get("source");
        let template = Arc::new(TaskTemplate::from_yaml(
            &yaml,
            std::path::Path::new(&format!("{source} (from database)")),
        )?);
        self.templates.insert(key.clone(), Arc::clone(&template));
        Ok(template)
    }

    async fn store_templates(&self) -> EngineResult<()> {
        let pool = self.pool()?;
        for template in self.local.iter() {
            sqlx::query(
                "INSERT INTO tasker_templates (namespace, name, version, yaml, source) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (namespace, name, version)
                 DO UPDATE SET yaml = EXCLUDED.yaml, source = EXCLUDED.source, updated_at = now()
                 WHERE tasker_templates.yaml IS DISTINCT FROM EXCLUDED.yaml",
            )
            .bind(&template.namespace)
            .bind(&template.name)
            .bind(&template.version)
            .bind(&template.yaml)
            .bind(template.source.display().to_string())
            .execute(pool)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    async fn snapshot(&mut self, task_uuid: Uuid) -> EngineResult<Option<TaskSnapshot>> {
        let pool = self.pool()?.clone();
        let Some(task) = sqlx::query(
            "SELECT namespace, name, version, status FROM tasker_tasks WHERE task_uuid = $1",
        )
        .bind(task_uuid)
        .fetch_optional(&pool)
        .await
        .map_err(db)?
        else {
            return Ok(None);
        };
        let steps = sqlx::query(
            "SELECT step_uuid, name, status, attempts, result, error_message FROM tasker_steps
             WHERE task_uuid = $1 ORDER BY step_index",
        )
        .bind(task_uuid)
        .fetch_all(&pool)
        .await
        .map_err(db)?;
        Ok(Some(TaskSnapshot {
            task_uuid,
            namespace: task.get("namespace"),
            name: task.get("name"),
            version: task.get("version"),
            status: task_status(task.get("status")),
            created_at_ns: None,
            completed_at_ns: None,
            steps_retained: true,
            steps: steps
                .into_iter()
                .map(|row| StepSnapshot {
                    step_uuid: row.get("step_uuid"),
                    name: row.get("name"),
                    status: step_status(row.get("status")),
                    attempts: row.get::<i32, _>("attempts") as u32,
                    result: row.get::<Option<Value>, _>("result").map(Arc::new),
                    metadata: None,
                    error_message: row.get("error_message"),
                    started_at_ns: None,
                    completed_at_ns: None,
                })
                .collect(),
        }))
    }

    /// Answer waiters whose tasks have finished (from a notification or a periodic check).
    async fn answer_waiters(&mut self, candidates: Vec<Uuid>) {
        for task_uuid in candidates {
            if !self.waiters.contains_key(&task_uuid) {
                continue;
            }
            match self.snapshot(task_uuid).await {
                Ok(Some(snapshot)) if snapshot.status.is_finished() => {
                    for waiter in self.waiters.remove(&task_uuid).unwrap_or_default() {
                        let _ = waiter.try_send(Ok(snapshot.clone()));
                    }
                }
                Ok(_) => {}
                Err(e) => debug!(error = %e, "checking a waited task failed; will check again"),
            }
        }
    }

    async fn housekeeping(&mut self, now: Instant) {
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING_EVERY;
            // Notifications can be missed across a reconnect: check waited tasks directly too.
            let waited: Vec<Uuid> = self.waiters.keys().copied().collect();
            self.answer_waiters(waited).await;
            self.waiters.retain(|_, replies| {
                replies.retain(|r| !r.is_full());
                !replies.is_empty()
            });
        }
        if now >= self.next_cleanup {
            self.next_cleanup = now + cleanup_every(self.settings.finished_task_ttl);
            let ttl = self.settings.finished_task_ttl.as_secs_f64();
            if let Ok(pool) = self.pool() {
                match sqlx::query(
                    "DELETE FROM tasker_tasks WHERE task_uuid IN (
                       SELECT task_uuid FROM tasker_tasks
                       WHERE finished_at < now() - make_interval(secs => $1) LIMIT 5000)",
                )
                .bind(ttl)
                .execute(pool)
                .await
                {
                    Ok(done) if done.rows_affected() > 0 => {
                        info!(
                            deleted = done.rows_affected(),
                            "deleted finished tasks older than finished_task_ttl"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "deleting old finished tasks failed"),
                }
            }
        }
    }

    /// EventDriven: nothing polls, so wake up when the earliest hidden row becomes visible.
    async fn schedule_wake(&mut self, pool: &PgPool, now: Instant) {
        let next = sqlx::query_scalar::<_, Option<f64>>(
            "SELECT extract(epoch FROM min(visible_at) - now())::float8 FROM tasker_ready_steps
             WHERE namespace = ANY($1) AND visible_at > now()",
        )
        .bind(&self.settings.namespaces)
        .fetch_one(pool)
        .await;
        match next {
            Ok(Some(secs)) => {
                // A little late rather than early: an early claim finds nothing and asks again.
                let at = Instant::now() + Duration::from_secs_f64(secs.clamp(0.0, 3600.0) + 0.002);
                self.wake_claim_at = Some(self.wake_claim_at.map_or(at, |w| w.min(at)));
            }
            Ok(None) => {}
            // Try again shortly rather than never.
            Err(e) => {
                debug!(error = %e, "finding the next visible step failed");
                self.wake_claim_at = Some(now + RETRY_WRITE_AFTER);
            }
        }
    }

    /// Events for claimed rows (templates, dependency results). An attempt beyond the last one
    /// allowed (its worker died holding the last) is recorded as timed out instead.
    async fn build_events(
        &mut self,
        pool: &PgPool,
        rows: &[PgRow],
        now: Instant,
    ) -> EngineResult<Vec<(StepExecutionEvent, InFlight)>> {
        // Dependency results of every claimed step, in one query.
        let task_uuids: Vec<Uuid> = rows.iter().map(|r| r.get("task_uuid")).collect();
        let results = sqlx::query(
            "SELECT task_uuid, step_index, result FROM tasker_steps WHERE task_uuid = ANY($1) AND status = 'complete'",
        )
        .bind(&task_uuids)
        .fetch_all(pool)
        .await
        .map_err(db)?;
        let mut result_of: HashMap<(Uuid, i32), Arc<Value>> = HashMap::new();
        for r in results {
            result_of.insert(
                (r.get("task_uuid"), r.get("step_index")),
                Arc::new(r.get::<Option<Value>, _>("result").unwrap_or(Value::Null)),
            );
        }

        let mut claimed = Vec::with_capacity(rows.len());
        let mut exhausted = Vec::new();
        let mut infos: HashMap<Uuid, Arc<TaskInfo>> = HashMap::new();
        for row in rows {
            let key = TemplateKey {
                namespace: row.get("namespace"),
                name: row.get("name"),
                version: row.get("version"),
            };
            let template = self.template(&key).await?;
            let task_uuid: Uuid = row.get("task_uuid");
            let index = row.get::<i32, _>("step_index") as usize;
            let attempt = row.get::<i32, _>("attempts") as u32;
            let definition = Arc::clone(&template.steps[index]);
            let flight = InFlight::new(
                task_uuid,
                row.get("step_uuid"),
                index,
                &definition,
                attempt,
                now,
            );
            self.flight_templates
                .insert(flight.step_uuid, Arc::clone(&template));
            if attempt > definition.retry.max_attempts {
                // The worker holding the last allowed attempt died: that attempt failed.
                exhausted.push(flight);
                continue;
            }
            let info = infos
                .entry(task_uuid)
                .or_insert_with(|| {
                    Arc::new(TaskInfo {
                        task_uuid,
                        namespace: Arc::from(key.namespace.as_str()),
                        name: Arc::from(key.name.as_str()),
                        version: Arc::from(key.version.as_str()),
                        context: Arc::new(row.get::<Value, _>("context")),
                    })
                })
                .clone();
            let dependency_results = template.dependencies[index]
                .iter()
                .map(|&d| {
                    let result = result_of
                        .get(&(task_uuid, d as i32))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Value::Null));
                    (Arc::clone(&template.steps[d].name), result)
                })
                .collect();
            let event = StepExecutionEvent {
                event_id: Uuid::new_v4(),
                step_uuid: flight.step_uuid,
                task: info,
                definition,
                attempt,
                dependency_results,
                ready_at_ns: row.get::<i64, _>("ready_at_ns").max(0) as u64,
            };
            claimed.push((event, flight));
        }
        if !exhausted.is_empty() {
            let lost = exhausted
                .into_iter()
                .map(|mut f| {
                    f.attempt -= 1;
                    (f, AttemptOutcome::TimedOut)
                })
                .collect::<Vec<_>>();
            // Roll the attempt counter back to the lost attempt, then record it as timed out.
            let steps: Vec<Uuid> = lost.iter().map(|(f, _)| f.step_uuid).collect();
            sqlx::query(
                "UPDATE tasker_steps SET attempts = attempts - 1 WHERE step_uuid = ANY($1)",
            )
            .bind(&steps)
            .execute(pool)
            .await
            .map_err(db)?;
            self.record(lost, now).await?;
        }
        Ok(claimed)
    }

    /// Claimed attempts that never ran: the attempt does not count, the step is claimable now.
    async fn release_attempts(&mut self, steps: Vec<Uuid>, attempts: Vec<i32>) {
        let Ok(pool) = self.pool() else { return };
        let result = sqlx::query(
            "WITH input AS (SELECT * FROM unnest($1::uuid[], $2::int4[]) AS i(step_uuid, attempt)),
             back AS (
               UPDATE tasker_steps s SET attempts = s.attempts - 1, status = 'enqueued'
               FROM input i WHERE s.step_uuid = i.step_uuid AND s.attempts = i.attempt AND s.status = 'in_progress'
               RETURNING s.step_uuid
             ), visible AS (
               UPDATE tasker_ready_steps r SET visible_at = now(), claimed_by = NULL
               FROM back WHERE r.step_uuid = back.step_uuid
             )
             SELECT pg_notify($3, '')",
        )
        .bind(&steps)
        .bind(&attempts)
        .bind(STEPS_READY)
        .execute(pool)
        .await;
        if let Err(e) = result {
            warn!(error = %e, "releasing unstarted steps failed; they become claimable after their timeout");
        }
    }

    /// How many steps a claim may take now: none unless something may be ready (a notification,
    /// our own enqueue, a poll or wake-up falling due), and no more than `max_in_flight` allows.
    fn claim_room(&mut self, now: Instant) -> usize {
        if self.stopping {
            return 0;
        }
        if self.polls() && self.next_poll.is_none_or(|at| now >= at) {
            self.maybe_ready = true;
        }
        if self.wake_claim_at.is_some_and(|at| now >= at) {
            self.wake_claim_at = None;
            self.maybe_ready = true;
        }
        if !self.maybe_ready {
            return 0;
        }
        self.settings.max_in_flight.saturating_sub(self.outstanding)
    }

    /// After a claim of `room` that took `got`: whether anything visible may be left.
    async fn claimed(&mut self, pool: &PgPool, room: usize, got: usize, now: Instant) {
        self.outstanding += got;
        if self.polls() {
            self.next_poll = Some(now + self.settings.poll_interval);
        }
        if got < room {
            self.maybe_ready = false;
            if !self.polls() {
                self.schedule_wake(pool, now).await;
            }
        }
    }

    /// One transaction: record the outcomes, then claim what this worker has room for (the
    /// successors just made ready among them), so a loop of the engine costs one commit.
    async fn write_outcomes(
        &mut self,
        outcomes: &[(InFlight, AttemptOutcome)],
        now: Instant,
    ) -> EngineResult<Vec<Uuid>> {
        let pool = self.pool()?.clone();
        let mut tx = pool.begin().await.map_err(db)?;
        let (finished, readiness) = record_in(&mut tx, self, outcomes).await?;
        let room = self.claim_room(now);
        let claimed = if room > 0 {
            claim_rows(&mut *tx, &self.settings, room).await?
        } else {
            Vec::new()
        };
        // Other workers need a NOTIFY only for what this one did not take: a retry falling due
        // later, or ready steps beyond its room. One per batch (NOTIFY takes a global lock at commit).
        let left_over = readiness.readied && (room == 0 || claimed.len() == room);
        if readiness.retried || left_over {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(STEPS_READY)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        notify_finished(&mut tx, &finished).await?;
        tx.commit().await.map_err(db)?;
        if room > 0 {
            self.claimed(&pool, room, claimed.len(), now).await;
            self.prefetched.extend(claimed);
        }
        Ok(finished)
    }
}

/// Finished tasks are deleted every minute, or every `finished_task_ttl` when that is shorter
/// (so a short TTL is honoured within about twice its length).
fn cleanup_every(ttl: Duration) -> Duration {
    CLEANUP_EVERY.min(ttl).max(Duration::from_millis(100))
}

/// Record successful attempts ($1 steps, $2 attempts, $3 results) and their effects: each edge
/// ($4 completed step → $5 task, $6 successor index, $7 its timeout, $8 namespace) of a current
/// completion counts toward that successor. Returns ("done", step) per current completion,
/// ("ready", step) per successor made ready, ("finished", task) per task now complete.
const COMPLETE_SQL: &str = "WITH input AS (
       SELECT * FROM unnest($1::uuid[], $2::int4[], $3::jsonb[]) AS i(step_uuid, attempt, result)
     ), done AS (
       UPDATE tasker_steps s SET status = 'complete', result = i.result, error_message = NULL
       FROM input i
       WHERE s.step_uuid = i.step_uuid AND s.attempts = i.attempt AND s.status = 'in_progress'
       RETURNING s.step_uuid, s.task_uuid
     ), gone AS (
       DELETE FROM tasker_ready_steps r USING done d WHERE r.step_uuid = d.step_uuid
     ), dec AS (
       SELECT e.task_uuid, e.step_index, count(*)::int4 AS n, min(e.timeout_ms) AS timeout_ms,
              min(e.namespace) AS namespace
       FROM unnest($4::uuid[], $5::uuid[], $6::int4[], $7::int4[], $8::text[])
              AS e(src, task_uuid, step_index, timeout_ms, namespace)
       JOIN done d ON d.step_uuid = e.src
       GROUP BY e.task_uuid, e.step_index
     ), upd AS (
       UPDATE tasker_steps s
       SET waiting_on = s.waiting_on - d.n,
           status = CASE WHEN s.waiting_on - d.n = 0 AND t.status <> 'error' THEN 'enqueued' ELSE s.status END,
           ready_at = CASE WHEN s.waiting_on - d.n = 0 THEN now() ELSE s.ready_at END
       FROM dec d JOIN tasker_tasks t ON t.task_uuid = d.task_uuid
       WHERE s.task_uuid = d.task_uuid AND s.step_index = d.step_index
       RETURNING s.step_uuid, s.task_uuid, s.waiting_on, d.timeout_ms, d.namespace, t.status AS task_status
     ), ready AS (
       INSERT INTO tasker_ready_steps (step_uuid, task_uuid, namespace, timeout_ms)
       SELECT step_uuid, task_uuid, namespace, timeout_ms FROM upd
       WHERE waiting_on = 0 AND task_status <> 'error'
       ON CONFLICT (step_uuid) DO NOTHING
       RETURNING step_uuid
     ), fin AS (
       UPDATE tasker_tasks t
       SET incomplete_steps = t.incomplete_steps - f.n,
           status = CASE WHEN t.incomplete_steps - f.n = 0 THEN 'complete'
                         WHEN t.status = 'pending' THEN 'in_progress' ELSE t.status END,
           finished_at = CASE WHEN t.incomplete_steps - f.n = 0 THEN now() ELSE t.finished_at END
       FROM (SELECT task_uuid, count(*)::int4 AS n FROM done GROUP BY task_uuid) f
       WHERE t.task_uuid = f.task_uuid
       RETURNING t.task_uuid, t.incomplete_steps
     )
     SELECT 'done' AS kind, step_uuid AS id FROM done
     UNION ALL SELECT 'ready', step_uuid FROM ready
     UNION ALL SELECT 'finished', task_uuid FROM fin WHERE incomplete_steps = 0";

/// Claim up to $2 ready steps of namespaces $1 for worker $3: visibility pushed forward by each
/// step's timeout, attempt counted, task marked in progress. Returns what events are built from.
const CLAIM_SQL: &str = "WITH claimable AS (
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
               SET visible_at = now() + make_interval(secs => r.timeout_ms / 1000.0), claimed_by = $3
               FROM claimable c WHERE r.step_uuid = c.step_uuid
               RETURNING r.step_uuid, r.timeout_ms
             ), bumped AS (
               UPDATE tasker_steps s SET attempts = s.attempts + 1, status = 'in_progress'
               FROM claimed c WHERE s.step_uuid = c.step_uuid
               RETURNING s.step_uuid, s.task_uuid, s.step_index, s.attempts,
                         (extract(epoch FROM coalesce(s.ready_at, now())) * 1e9)::int8 AS ready_at_ns, c.timeout_ms
             ), started AS (
               UPDATE tasker_tasks t SET status = 'in_progress'
               WHERE t.task_uuid IN (SELECT task_uuid FROM bumped) AND t.status = 'pending'
             )
             SELECT b.*, t.namespace, t.name, t.version, t.context
             FROM bumped b JOIN tasker_tasks t ON t.task_uuid = b.task_uuid";

async fn claim_rows<'e, E>(
    executor: E,
    settings: &PostgresSettings,
    max: usize,
) -> EngineResult<Vec<PgRow>>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    sqlx::query(CLAIM_SQL)
        .bind(&settings.namespaces)
        .bind(max as i64)
        .bind(&settings.worker_id)
        .fetch_all(executor)
        .await
        .map_err(db)
}

fn db(e: sqlx::Error) -> EngineError {
    EngineError::Internal(format!("postgres: {e}"))
}

fn task_status(s: &str) -> TaskStatus {
    match s {
        "in_progress" => TaskStatus::InProgress,
        "complete" => TaskStatus::Complete,
        "error" => TaskStatus::Error,
        _ => TaskStatus::Pending,
    }
}

fn step_status(s: &str) -> StepStatus {
    match s {
        "enqueued" => StepStatus::Enqueued,
        "in_progress" => StepStatus::InProgress,
        "complete" => StepStatus::Complete,
        "error" => StepStatus::Error,
        "waiting_for_retry" => StepStatus::WaitingForRetry,
        _ => StepStatus::Pending,
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:****@host/db`, for error messages.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:****{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

fn ms(d: Duration) -> i32 {
    d.as_millis().min(i32::MAX as u128) as i32
}

/// What a batch of outcomes made claimable.
#[derive(Default)]
struct Readiness {
    /// Successors became ready now.
    readied: bool,
    /// Steps will be ready again after their backoff.
    retried: bool,
}

/// One batch of outcomes, inside `tx`. Returns the tasks that finished.
async fn record_in(
    tx: &mut Transaction<'static, Postgres>,
    backend: &mut PostgresBackend,
    outcomes: &[(InFlight, AttemptOutcome)],
) -> EngineResult<(Vec<Uuid>, Readiness)> {
    // Lock rows in one order in every transaction, so concurrent batches cannot deadlock.
    let mut ordered: Vec<&(InFlight, AttemptOutcome)> = outcomes.iter().collect();
    ordered.sort_by_key(|(f, _)| (f.task_uuid, f.step_index));

    let mut ok_steps = Vec::new();
    let mut ok_attempts = Vec::new();
    let mut ok_results = Vec::new();
    let (mut edge_src, mut edge_task, mut edge_index, mut edge_timeout, mut edge_namespace) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::<String>::new(),
    );
    let mut retry_steps = Vec::new();
    let mut retry_attempts = Vec::new();
    let mut retry_delays = Vec::new();
    let mut retry_messages = Vec::new();
    let mut fail_steps = Vec::new();
    let mut fail_attempts = Vec::new();
    let mut fail_messages = Vec::new();

    // Templates by task (successors, retry policies): known from the claim, else looked up.
    let mut template_of: HashMap<Uuid, Arc<TaskTemplate>> = HashMap::new();
    for (flight, _) in &ordered {
        if let Some(t) = backend.flight_templates.get(&flight.step_uuid) {
            template_of.insert(flight.task_uuid, Arc::clone(t));
        }
    }
    let unknown: Vec<Uuid> = ordered
        .iter()
        .map(|(f, _)| f.task_uuid)
        .filter(|t| !template_of.contains_key(t))
        .collect();
    if !unknown.is_empty() {
        let rows = sqlx::query("SELECT task_uuid, namespace, name, version FROM tasker_tasks WHERE task_uuid = ANY($1)")
            .bind(&unknown)
            .fetch_all(&mut **tx)
            .await
            .map_err(db)?;
        for row in rows {
            let key = TemplateKey {
                namespace: row.get("namespace"),
                name: row.get("name"),
                version: row.get("version"),
            };
            template_of.insert(row.get("task_uuid"), backend.template(&key).await?);
        }
    }

    for (flight, outcome) in ordered {
        let (retryable, retry_after, message) = match outcome {
            AttemptOutcome::Completed(c) if c.success => {
                ok_steps.push(flight.step_uuid);
                ok_attempts.push(flight.attempt as i32);
                ok_results.push(c.result.clone());
                // The successors this completion counts toward (applied only if it is current).
                if let Some(template) = template_of.get(&flight.task_uuid) {
                    for &next in &template.dependents[flight.step_index] {
                        edge_src.push(flight.step_uuid);
                        edge_task.push(flight.task_uuid);
                        edge_index.push(next as i32);
                        edge_timeout.push(ms(template.steps[next].timeout));
                        edge_namespace.push(template.namespace.clone());
                    }
                }
                continue;
            }
            AttemptOutcome::Completed(c) => (c.retryable, c.retry_after, c.failure_message()),
            AttemptOutcome::TimedOut => (true, None, flight.timeout_message()),
            AttemptOutcome::Cancelled(_) => (false, None, "cancelled while running".to_string()),
        };
        let Some(template) = template_of.get(&flight.task_uuid) else {
            continue;
        };
        let policy = &template.steps[flight.step_index].retry;
        if retryable && policy.retryable && flight.attempt < policy.max_attempts {
            retry_steps.push(flight.step_uuid);
            retry_attempts.push(flight.attempt as i32);
            retry_delays.push(ms(
                retry_after.unwrap_or_else(|| policy.delay_after(flight.attempt))
            ));
            retry_messages.push(message);
        } else {
            fail_steps.push(flight.step_uuid);
            fail_attempts.push(flight.attempt as i32);
            fail_messages.push(if !retryable || !policy.retryable {
                message
            } else {
                format!("{message} (gave up after {} attempts)", flight.attempt)
            });
        }
    }

    let mut finished = Vec::new();
    let mut readiness = Readiness::default();

    if !ok_steps.is_empty() {
        // One statement: results, the hot table, successors (a successor whose last dependency
        // just completed becomes ready), task counters. Every part keys on the completions that
        // were current (`done`): a stale one changes nothing.
        let rows = sqlx::query(COMPLETE_SQL)
            .bind(&ok_steps)
            .bind(&ok_attempts)
            .bind(&ok_results)
            .bind(&edge_src)
            .bind(&edge_task)
            .bind(&edge_index)
            .bind(&edge_timeout)
            .bind(&edge_namespace)
            .fetch_all(&mut **tx)
            .await
            .map_err(db)?;
        let mut done = 0;
        for row in rows {
            match row.get::<&str, _>("kind") {
                "done" => done += 1,
                "ready" => readiness.readied = true,
                _ => finished.push(row.get::<Uuid, _>("id")),
            }
        }
        if done < ok_steps.len() {
            debug!(
                stale = ok_steps.len() - done,
                "completions for attempts that are no longer current"
            );
        }
    }

    if !retry_steps.is_empty() {
        sqlx::query(
            "WITH input AS (
               SELECT * FROM unnest($1::uuid[], $2::int4[], $3::int4[], $4::text[]) AS i(step_uuid, attempt, delay_ms, message)
             ), upd AS (
               UPDATE tasker_steps s
               SET status = 'waiting_for_retry', error_message = i.message,
                   ready_at = now() + make_interval(secs => i.delay_ms / 1000.0)
               FROM input i
               WHERE s.step_uuid = i.step_uuid AND s.attempts = i.attempt AND s.status = 'in_progress'
               RETURNING s.step_uuid, i.delay_ms
             )
             UPDATE tasker_ready_steps r
             SET visible_at = now() + make_interval(secs => upd.delay_ms / 1000.0), claimed_by = NULL
             FROM upd WHERE r.step_uuid = upd.step_uuid",
        )
        .bind(&retry_steps)
        .bind(&retry_attempts)
        .bind(&retry_delays)
        .bind(&retry_messages)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        readiness.retried = true;
    }

    if !fail_steps.is_empty() {
        let rows = sqlx::query(
            "WITH input AS (
               SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[]) AS i(step_uuid, attempt, message)
             ), failed AS (
               UPDATE tasker_steps s SET status = 'error', error_message = i.message
               FROM input i
               WHERE s.step_uuid = i.step_uuid AND s.attempts = i.attempt AND s.status = 'in_progress'
               RETURNING s.task_uuid
             )
             UPDATE tasker_tasks t SET status = 'error', finished_at = now()
             WHERE t.task_uuid IN (SELECT task_uuid FROM failed) AND t.status NOT IN ('complete', 'error')
             RETURNING t.task_uuid",
        )
        .bind(&fail_steps)
        .bind(&fail_attempts)
        .bind(&fail_messages)
        .fetch_all(&mut **tx)
        .await
        .map_err(db)?;
        let errored: Vec<Uuid> = rows.iter().map(|r| r.get("task_uuid")).collect();
        // An errored task runs nothing more: its queued steps leave the hot table.
        sqlx::query(
            "DELETE FROM tasker_ready_steps WHERE task_uuid = ANY($1) OR step_uuid = ANY($2)",
        )
        .bind(&errored)
        .bind(&fail_steps)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        finished.extend(errored);
    }

    if readiness.readied || readiness.retried {
        backend.maybe_ready = true;
    }
    Ok((finished, readiness))
}

async fn notify_finished(
    tx: &mut Transaction<'static, Postgres>,
    finished: &[Uuid],
) -> EngineResult<()> {
    // A NOTIFY payload holds < 8000 bytes: 200 uuids (37 bytes each with the comma) per message.
    for chunk in finished.chunks(200) {
        let payload = chunk
            .iter()
            .map(Uuid::to_string)
            .collect::<Vec<_>>()
            .join(",");
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(TASKS_FINISHED)
            .bind(payload)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
    }
    Ok(())
}

async fn listen(pool: PgPool, inbox: UnboundedSender<EngineMessage>) {
    let mut listener = loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut l) => match l.listen_all([STEPS_READY, TASKS_FINISHED]).await {
                Ok(()) => break l,
                Err(e) => warn!(error = %e, "LISTEN failed; retrying"),
            },
            Err(e) => warn!(error = %e, "listener cannot connect; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    loop {
        let message = match listener.try_recv().await {
            Ok(Some(n)) if n.channel() == STEPS_READY => Notification::StepsReady,
            Ok(Some(n)) => Notification::TasksFinished(
                n.payload()
                    .split(',')
                    .filter_map(|s| Uuid::parse_str(s).ok())
                    .collect(),
            ),
            // The connection dropped; the next try_recv reconnects and re-listens.
            Ok(None) => Notification::Reconnected,
            Err(e) => {
                warn!(error = %e, "listener error; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                Notification::Reconnected
            }
        };
        if inbox.send(EngineMessage::Notify(message)).is_err() {
            return;
        }
    }
}

impl Backend for PostgresBackend {
    async fn start(&mut self, inbox: UnboundedSender<EngineMessage>) -> EngineResult<()> {
        let masked = mask_url(&self.settings.url);
        let pool = PgPoolOptions::new()
            .max_connections(self.settings.pool_size)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect(&self.settings.url)
            .await
            .map_err(|e| {
                EngineError::Bootstrap(format!("cannot connect to PostgreSQL at {masked}: {e}"))
            })?;
        // sqlx serialises concurrent migrators with an advisory lock: simultaneous bootstraps are safe.
        MIGRATOR.run(&pool).await.map_err(|e| {
            EngineError::Bootstrap(format!("migrating the schema at {masked} failed: {e}"))
        })?;
        self.pool = Some(pool.clone());
        self.store_templates().await?;
        if self.listens() {
            tokio::spawn(listen(pool, inbox));
        }
        info!(url = %masked, mode = self.settings.mode.as_str(), "postgres backend ready");
        Ok(())
    }

    async fn create_tasks(
        &mut self,
        key: TemplateKey,
        template: Option<Arc<TaskTemplate>>,
        contexts: Vec<Value>,
    ) -> EngineResult<Vec<Uuid>> {
        let template = match template {
            Some(t) => t,
            None => self.template(&key).await?,
        };
        // One row per task, one per step and one per root step, for every task at once: three
        // statements and one commit, however many tasks.
        let n = template.steps.len();
        let task_uuids: Vec<Uuid> = contexts.iter().map(|_| Uuid::new_v4()).collect();
        let roots: Vec<usize> = (0..n)
            .filter(|&i| template.dependencies[i].is_empty())
            .collect();
        let rows = task_uuids.len() * n;
        let mut step_uuids = Vec::with_capacity(rows);
        let mut step_tasks = Vec::with_capacity(rows);
        let mut indices = Vec::with_capacity(rows);
        let mut names = Vec::with_capacity(rows);
        let mut waiting = Vec::with_capacity(rows);
        let mut root_uuids = Vec::with_capacity(task_uuids.len() * roots.len());
        let mut root_tasks = Vec::with_capacity(task_uuids.len() * roots.len());
        let mut root_timeouts = Vec::with_capacity(task_uuids.len() * roots.len());
        for &task_uuid in &task_uuids {
            let first = step_uuids.len();
            for (i, step) in template.steps.iter().enumerate() {
                step_uuids.push(Uuid::new_v4());
                step_tasks.push(task_uuid);
                indices.push(i as i32);
                names.push(step.name.to_string());
                waiting.push(template.dependencies[i].len() as i32);
            }
            for &i in &roots {
                root_uuids.push(step_uuids[first + i]);
                root_tasks.push(task_uuid);
                root_timeouts.push(ms(template.steps[i].timeout));
            }
        }

        let mut tx = self.pool()?.begin().await.map_err(db)?;
        sqlx::query(
            "INSERT INTO tasker_tasks (task_uuid, namespace, name, version, context, status, incomplete_steps)
             SELECT u, $3, $4, $5, c, 'pending', $6 FROM unnest($1::uuid[], $2::jsonb[]) AS x(u, c)",
        )
        .bind(&task_uuids)
        .bind(&contexts)
        .bind(&template.namespace)
        .bind(&template.name)
        .bind(&template.version)
        .bind(n as i32)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "INSERT INTO tasker_steps (step_uuid, task_uuid, step_index, name, status, waiting_on, ready_at)
             SELECT u, t, i, nm, CASE WHEN w = 0 THEN 'enqueued' ELSE 'pending' END, w,
                    CASE WHEN w = 0 THEN now() END
             FROM unnest($1::uuid[], $2::uuid[], $3::int4[], $4::text[], $5::int4[]) AS x(u, t, i, nm, w)",
        )
        .bind(&step_uuids)
        .bind(&step_tasks)
        .bind(&indices)
        .bind(&names)
        .bind(&waiting)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "INSERT INTO tasker_ready_steps (step_uuid, task_uuid, namespace, timeout_ms)
             SELECT u, t, $3, ms FROM unnest($1::uuid[], $2::uuid[], $4::int4[]) AS x(u, t, ms)",
        )
        .bind(&root_uuids)
        .bind(&root_tasks)
        .bind(&template.namespace)
        .bind(&root_timeouts)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(STEPS_READY)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.maybe_ready = true;
        Ok(task_uuids)
    }

    async fn task_status(&mut self, task_uuid: Uuid) -> EngineResult<TaskSnapshot> {
        self.snapshot(task_uuid).await?.ok_or_else(|| {
            EngineError::UnknownTask(format!("{task_uuid}: no such task in the database (finished tasks are deleted after finished_task_ttl)"))
        })
    }

    async fn wait_for_task(&mut self, task_uuid: Uuid, reply: SnapshotReply) {
        match self.snapshot(task_uuid).await {
            Ok(Some(snapshot)) if snapshot.status.is_finished() => {
                let _ = reply.try_send(Ok(snapshot));
            }
            Ok(Some(_)) => self.waiters.entry(task_uuid).or_default().push(reply),
            Ok(None) => {
                let _ = reply.try_send(Err(EngineError::UnknownTask(format!(
                    "{task_uuid}: no such task in the database"
                ))));
            }
            Err(e) => {
                let _ = reply.try_send(Err(e));
            }
        }
    }

    fn forget_waiter(&mut self, task_uuid: Uuid, reply: &SnapshotReply) {
        if let Some(waiters) = self.waiters.get_mut(&task_uuid) {
            waiters.retain(|w| !w.same_channel(reply));
            if waiters.is_empty() {
                self.waiters.remove(&task_uuid);
            }
        }
    }

    // TODO(issue E): cancel and retry across processes on PostgreSQL.
    async fn cancel_task(&mut self, _task_uuid: Uuid) -> EngineResult<bool> {
        Err(EngineError::config(
            "cancel_task is not available on the postgres backend yet",
        ))
    }

    async fn retry_task(&mut self, _task_uuid: Uuid) -> EngineResult<()> {
        Err(EngineError::config(
            "retry_task is not available on the postgres backend yet",
        ))
    }

    async fn tick(&mut self, now: Instant) {
        self.housekeeping(now).await;
        if self.retry_write_at.is_some_and(|at| now >= at) {
            self.retry_write_at = None;
            let _ = self.record(Vec::new(), now).await;
        }
    }

    async fn claim(
        &mut self,
        max: usize,
        now: Instant,
    ) -> EngineResult<Vec<(StepExecutionEvent, InFlight)>> {
        // Claimed by the last record transaction: hand those out first.
        let mut rows: Vec<PgRow> = {
            let n = self.prefetched.len().min(max);
            self.prefetched.drain(..n).collect()
        };
        let room = (max - rows.len()).min(self.claim_room(now));
        let pool = self.pool()?.clone();
        if room > 0 {
            match claim_rows(&pool, &self.settings, room).await {
                Ok(fresh) => {
                    self.claimed(&pool, room, fresh.len(), now).await;
                    rows.extend(fresh);
                }
                Err(e) if rows.is_empty() => return Err(e),
                Err(e) => warn!(error = %e, "claiming ready steps failed"),
            }
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        match self.build_events(&pool, &rows, now).await {
            Ok(claimed) => Ok(claimed),
            Err(e) => {
                // Claimed in the database: keep them for the next try, never lose them.
                self.prefetched.splice(0..0, rows);
                Err(e)
            }
        }
    }

    async fn record(
        &mut self,
        mut outcomes: Vec<(InFlight, AttemptOutcome)>,
        now: Instant,
    ) -> EngineResult<Vec<Uuid>> {
        self.outstanding = self.outstanding.saturating_sub(outcomes.len());
        if !self.unrecorded.is_empty() {
            outcomes.append(&mut self.unrecorded);
        }
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let mut attempt = 0;
        loop {
            match self.write_outcomes(&outcomes, now).await {
                Ok(finished) => {
                    for (flight, _) in &outcomes {
                        self.flight_templates.remove(&flight.step_uuid);
                    }
                    if !self.waiters.is_empty() {
                        self.answer_waiters(finished).await;
                    }
                    return Ok(Vec::new());
                }
                // A deadlock or serialization failure: the transaction rolled back, try again now.
                Err(EngineError::Internal(m))
                    if attempt < 3
                        && (m.contains("deadlock") || m.contains("could not serialize")) =>
                {
                    attempt += 1;
                }
                Err(e) => {
                    warn!(error = %e, outcomes = outcomes.len(), "recording outcomes failed; they are kept and retried");
                    self.unrecorded = outcomes;
                    self.retry_write_at = Some(now + RETRY_WRITE_AFTER);
                    return Ok(Vec::new());
                }
            }
        }
    }

    async fn release(&mut self, unstarted: Vec<InFlight>) {
        self.outstanding = self.outstanding.saturating_sub(unstarted.len());
        for flight in &unstarted {
            self.flight_templates.remove(&flight.step_uuid);
        }
        let steps: Vec<Uuid> = unstarted.iter().map(|f| f.step_uuid).collect();
        let attempts: Vec<i32> = unstarted.iter().map(|f| f.attempt as i32).collect();
        self.release_attempts(steps, attempts).await;
    }

    async fn stop_claiming(&mut self) {
        self.stopping = true;
        if self.prefetched.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.prefetched);
        self.outstanding = self.outstanding.saturating_sub(held.len());
        let steps = held.iter().map(|r| r.get::<Uuid, _>("step_uuid")).collect();
        let attempts = held.iter().map(|r| r.get::<i32, _>("attempts")).collect();
        self.release_attempts(steps, attempts).await;
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let poll = if self.polls() { self.next_poll } else { None };
        let waiters = (!self.waiters.is_empty()).then_some(self.next_housekeeping);
        [
            poll,
            self.wake_claim_at,
            self.retry_write_at,
            waiters,
            Some(self.next_cleanup),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn notify(&mut self, notification: Notification) {
        match notification {
            Notification::StepsReady | Notification::Reconnected => self.maybe_ready = true,
            Notification::TasksFinished(tasks) => {
                // Answered on the next tick.
                if tasks.iter().any(|t| self.waiters.contains_key(t)) {
                    self.next_housekeeping = Instant::now();
                }
            }
        }
    }

    fn pool_stats(&self) -> (u32, u32) {
        self.pool
            .as_ref()
            .map_or((0, 0), |p| (p.size(), p.num_idle() as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::mask_url;

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:****@db:5432/x"
        );
        assert_eq!(mask_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(mask_url("postgres://db/x"), "postgres://db/x");
    }
}
