//! The durable backend: many worker processes on many hosts share one PostgreSQL database.
//!
//! - Ready steps live in a small hot table (`tasker_ready_steps`). Claims take them with
//!   `FOR UPDATE SKIP LOCKED` and push `visible_at` forward by the claim lease (`claim_lease`).
//!   The engine renews the lease of every attempt it holds (queued for Ruby, running, or timed
//!   out with its handler not yet returned) every third of the lease, in one UPDATE: a step is
//!   claimable again only once its owner has stopped renewing (it died, or lost the database)
//!   for a whole lease, and the next claim counts a new attempt.
//! - Endings: a step that fails for good sets its task's `ending` (`error`; a cancel sets
//!   `cancelled`): claims skip the task from then on, its steps that have not started become
//!   `skipped` (`cancelled`), and the task takes its ending as its status once none of its steps
//!   is in progress. A cancel is announced on `tasker_tasks_halted`, so that the process running
//!   a step of the task interrupts it; every writer locks the task's row first, so a cancel and
//!   a completion of the same task are serialised.
//! - Recording a batch of outcomes is one transaction: results, retries, successors made ready,
//!   task completion, then a claim of what this worker has room for (often the successors just
//!   made ready). Every write is conditioned on the attempt number, so a stale completion (its
//!   step was reclaimed meanwhile) changes nothing: each step's final result is recorded once.
//! - That transaction runs on its own tokio task, one at a time: while it waits (on a row lock,
//!   a restarting database), the engine thread keeps answering `create_task`, `task_status`
//!   and `wait_for_task`, and gathers the next batch. Its result comes back through a channel,
//!   and a [`Notification::BackendWorkDone`] wakes the engine loop to take it.
//! - A batch that fails for a reason retrying cannot cure (a value the database cannot store)
//!   is split until the outcome at fault is alone; that step fails with the database's reason
//!   and every other outcome is recorded. A batch blocked by another session's row lock (a
//!   paused worker) records what is not locked and keeps the rest for later.
//! - Every connection sets `lock_timeout`, `idle_in_transaction_session_timeout` and TCP
//!   keepalives, so a paused or partitioned worker holds its row locks for seconds, not hours.
//! - A worker holds at most `max_in_flight` claimed steps (twice its handler threads): a claimed
//!   attempt's timeout runs from the claim, so it must not wait long for a free thread.
//! - Wake-ups: LISTEN/NOTIFY (EventDriven), a periodic claim (Polling), or both (Hybrid). One
//!   NOTIFY per transaction at most, and only for steps the sender did not claim itself.
//!   EventDriven workers also wake when the earliest hidden row becomes visible (a retry's
//!   backoff, an expired claim), and every mode claims once at start. The LISTEN connection is
//!   its own (not one of the pool's) and is checked with a query whenever it has been quiet
//!   for a few seconds: a connection that died silently is replaced.

use super::{Backend, CreatedReply, Notification, NotificationSender, SnapshotReply};
use crate::attempt::{AttemptOutcome, InFlight, MAX_RETRY_AFTER};
use crate::config::DeploymentMode;
use crate::error::{EngineError, EngineResult};
use crate::events::{
    StepExecutionEvent, StepSnapshot, StepStatus, TaskInfo, TaskSnapshot, TaskStatus,
};
use crate::metrics::Metrics;
use crate::task_list::{TaskPage, TaskQuery};
use crate::template::{TaskTemplate, TemplateKey, TemplateRegistry};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

const STEPS_READY: &str = "tasker_steps_ready";
const TASKS_FINISHED: &str = "tasker_tasks_finished";
/// Tasks that stopped starting steps; payload `cancelled:<uuid>,...` or `error:<uuid>,...`.
const TASKS_HALTED: &str = "tasker_tasks_halted";
/// How long a failed write (or claim) waits before it is tried again (the database may be restarting).
const RETRY_WRITE_AFTER: Duration = Duration::from_millis(250);
/// Longest a record transaction may take before it is abandoned (rolled back) and retried:
/// a connection that died silently must not hold the outcomes forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Polling mode has no notifications: waited tasks are checked this often (one query for all).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
const CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// Retries (`RETRY_WRITE_AFTER` apart) of a failed write while shutting down, before the
/// outcomes are left to the claims' expiry (their steps then run again elsewhere).
const SHUTDOWN_WRITE_RETRIES: usize = 8;
/// Finished tasks deleted per statement by the retention cleanup (which loops until none is left).
const CLEANUP_BATCH: i64 = 5000;
/// The LISTEN connection is asked `SELECT 1` after this long without a message...
const LISTENER_HEARTBEAT: Duration = Duration::from_secs(5);
/// ...and replaced if it does not answer within this.
const LISTENER_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// Session settings of every connection (the pool's and the listener's), so that one paused or
/// partitioned worker costs the others seconds: its row locks are waited on for at most
/// `lock_timeout`; a transaction it leaves idle (SIGSTOP, a frozen VM) is ended by the server
/// after `idle_in_transaction_session_timeout`; and the server notices a peer that vanished
/// without a FIN after about `idle + interval × count` seconds of TCP keepalives (or
/// `tcp_user_timeout` ms of unacknowledged data), instead of the kernel default of two hours.
/// `client_min_messages = warning` keeps routine notices out of the app's log (every boot's
/// `CREATE TABLE IF NOT EXISTS _sqlx_migrations` answers "already exists, skipping").
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("client_min_messages", "warning"),
    ("lock_timeout", "2s"),
    ("idle_in_transaction_session_timeout", "5s"),
    ("tcp_keepalives_idle", "5"),
    ("tcp_keepalives_interval", "2"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "10000"),
];

/// A build may run against a schema that has migrations it does not know, as long as they are
/// additive. A migration that older builds cannot run against raises
/// `tasker_schema_compat.min_migration` to its own version; a build whose newest migration is
/// older refuses to start.
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

pub struct PostgresSettings {
    pub url: String,
    /// Connections for work; the LISTEN connection (Hybrid, EventDriven) is one more.
    pub pool_size: u32,
    pub worker_id: String,
    pub namespaces: Vec<String>,
    pub mode: DeploymentMode,
    pub poll_interval: Duration,
    pub finished_task_ttl: Duration,
    /// How long a claim holds without renewal (renewed every third of it while the attempt is
    /// out here).
    pub claim_lease: Duration,
    /// Most attempts claimed and not yet recorded or released (running or queued for Ruby).
    /// A claimed attempt's timeout runs from the claim: steps must not wait in this process
    /// longer than they take to run, or they time out unstarted.
    pub max_in_flight: usize,
    /// Where the tasks this process finishes are announced (`task.completed` and the like),
    /// while `announce_ends` is set (something observes them).
    pub task_ends: crossbeam_channel::Sender<TaskSnapshot>,
    pub announce_ends: Arc<AtomicBool>,
}

/// What a claim needs, shared with the write tasks.
struct ClaimScope {
    namespaces: Vec<String>,
    worker_id: String,
    /// The claim lease, in seconds.
    lease_secs: f64,
}

/// An attempt claimed here and not yet recorded or released.
struct Owned {
    attempt: u32,
    /// The step's `attempt_base` (its retry budget counts from there).
    base: u32,
    template: Arc<TaskTemplate>,
}

/// One attempt's outcome, decided on the engine thread and ready to be written.
#[derive(Clone)]
struct Entry {
    flight: InFlight,
    /// The task's template (successors of a completed step); `None` when `effect` needs none.
    template: Option<Arc<TaskTemplate>>,
    effect: Effect,
    /// The completion's metadata, stored with the step (`None`: no completion reported any,
    /// as when the attempt timed out).
    metadata: Option<Value>,
}

#[derive(Clone)]
enum Effect {
    Complete(Value),
    Retry { delay_ms: i64, message: String },
    Fail(String),
}

/// What one write task did, handed back to the engine thread.
#[derive(Default)]
struct WriteDone {
    /// Attempts (step, attempt) whose outcomes are settled (written, or found stale).
    recorded: Vec<(Uuid, u32)>,
    /// Tasks that stopped starting steps because a step failed for good.
    halted: Vec<Uuid>,
    /// Outcomes not written (the database is unreachable, rows are locked): written later.
    kept: Vec<Entry>,
    /// Why something was kept, for the log.
    kept_because: Option<String>,
    /// How many of `kept` wait for rows another session holds.
    deferred: usize,
    finished: Vec<Uuid>,
    readiness: Readiness,
    /// Claim room reserved for the transaction (counted in `outstanding` while it ran).
    reserved: usize,
    /// The claim in the transaction ran, and committed.
    claim_ran: bool,
    /// The transaction failed: whatever it would have claimed is still there.
    claim_lost: bool,
    claimed: Vec<PgRow>,
}

pub struct PostgresBackend {
    settings: PostgresSettings,
    scope: Arc<ClaimScope>,
    local: Arc<TemplateRegistry>,
    pool: Option<PgPool>,
    /// Templates by key: local ones, and others loaded from the database on first use.
    templates: HashMap<TemplateKey, Arc<TaskTemplate>>,
    /// Whether a claim may find something (set by notifications, polls, our own enqueues).
    maybe_ready: bool,
    next_poll: Option<Instant>,
    waiters: HashMap<Uuid, Vec<SnapshotReply>>,
    /// Tasks reported finished (by NOTIFY or our own writes) whose waiters are not answered yet.
    finished_unanswered: Vec<Uuid>,
    /// Every waited task must be checked directly (notifications may have been missed).
    recheck_waiters: bool,
    /// Outcomes waiting for the next write (gathered while one runs, or kept after a failure).
    pending: Vec<Entry>,
    /// A write task is running.
    writing: bool,
    /// The last write left outcomes behind another session's row locks.
    contended: bool,
    write_results: UnboundedReceiver<WriteDone>,
    write_results_sender: UnboundedSender<WriteDone>,
    /// Wakes the engine loop when a write task ends.
    wake: Option<NotificationSender>,
    /// Where `create_tasks` calls go to be committed in groups ([`create_in_groups`]).
    creator: Option<UnboundedSender<CreateRequest>>,
    creator_task: Option<JoinHandle<()>>,
    retry_write_at: Option<Instant>,
    next_housekeeping: Instant,
    next_cleanup: Instant,
    cleanup: Option<JoinHandle<()>>,
    /// Attempts claimed here and not yet recorded or released (`prefetched` included).
    outstanding: usize,
    /// Claimed in a record transaction, not yet handed to the engine.
    prefetched: Vec<PgRow>,
    /// The worker is shutting down: claim nothing more.
    stopping: bool,
    /// Each attempt claimed here and not yet recorded or released (by step): recording it needs
    /// no lookup, and its lease is renewed.
    owned: HashMap<Uuid, Owned>,
    /// Tasks that stopped starting steps, learned from this process's writes, for the engine.
    halted: Vec<Uuid>,
    /// Tasks halted here or elsewhere whose `prefetched` attempts must go back unstarted.
    halted_prefetched: Vec<Uuid>,
    next_renewal: Instant,
    renewal: Option<JoinHandle<()>>,
    /// A claim due without any notification: at start (steps may already be waiting), in
    /// EventDriven mode when the earliest hidden row becomes visible (a retry's backoff ends, the
    /// claim of a worker that died expires), and shortly after a claim that failed. Not a poll:
    /// a wake-up at a time the table (or the failure) names.
    wake_claim_at: Option<Instant>,
    /// Where write transactions' durations go (`tasker_backend_commit_duration_seconds`).
    metrics: Option<Arc<Metrics>>,
}

impl PostgresBackend {
    pub fn new(settings: PostgresSettings, local: Arc<TemplateRegistry>) -> Self {
        let templates = local.iter().map(|t| (t.key(), Arc::clone(t))).collect();
        let scope = Arc::new(ClaimScope {
            namespaces: settings.namespaces.clone(),
            worker_id: settings.worker_id.clone(),
            lease_secs: settings.claim_lease.as_secs_f64(),
        });
        let (write_results_sender, write_results) = unbounded_channel();
        let now = Instant::now();
        let first_renewal = renewal_every(settings.claim_lease);
        Self {
            settings,
            scope,
            local,
            pool: None,
            templates,
            maybe_ready: true,
            next_poll: None,
            waiters: HashMap::new(),
            finished_unanswered: Vec::new(),
            recheck_waiters: false,
            pending: Vec::new(),
            writing: false,
            contended: false,
            write_results,
            write_results_sender,
            wake: None,
            creator: None,
            creator_task: None,
            retry_write_at: None,
            next_housekeeping: now + HOUSEKEEPING_EVERY,
            // Right after start: whatever expired while no worker ran goes at once.
            next_cleanup: now,
            cleanup: None,
            outstanding: 0,
            prefetched: Vec::new(),
            stopping: false,
            owned: HashMap::new(),
            halted: Vec::new(),
            halted_prefetched: Vec::new(),
            next_renewal: now + first_renewal,
            renewal: None,
            wake_claim_at: Some(now),
            metrics: None,
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

    /// Store this process's templates for the others. A template stored under the same
    /// namespace, name and version with different content is never replaced: tasks created of
    /// it would run with another DAG. This process refuses to start instead.
    async fn store_templates(&self) -> EngineResult<()> {
        let pool = self.pool()?;
        for template in self.local.iter() {
            sqlx::query(
                "INSERT INTO tasker_templates (namespace, name, version, yaml, source) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (namespace, name, version) DO NOTHING",
            )
            .bind(&template.namespace)
            .bind(&template.name)
            .bind(&template.version)
            .bind(&template.yaml)
            .bind(template.source.display().to_string())
            .execute(pool)
            .await
            .map_err(db)?;
            let stored = sqlx::query(
                "SELECT yaml, source, to_char(updated_at, 'YYYY-MM-DD HH24:MI:SS TZ') AS stored_at
                 FROM tasker_templates WHERE namespace = $1 AND name = $2 AND version = $3",
            )
            .bind(&template.namespace)
            .bind(&template.name)
            .bind(&template.version)
            .fetch_one(pool)
            .await
            .map_err(db)?;
            let stored_yaml: String = stored.get("yaml");
            if stored_yaml != template.yaml
                && template_content(&stored_yaml) != template_content(&template.yaml)
            {
                let source: String = stored.get("source");
                let stored_at: String = stored.get("stored_at");
                return Err(EngineError::config(format!(
                    "template {} ({}) differs from the template stored in the database under the same namespace, \
                     name and version (stored from {source} at {stored_at}): tasks of one version must all run \
                     the same steps. Give the changed template a new `version`",
                    template.key(),
                    template.source.display(),
                )));
            }
        }
        Ok(())
    }

    async fn snapshot(&mut self, task_uuid: Uuid) -> EngineResult<Option<TaskSnapshot>> {
        let pool = self.pool()?.clone();
        let mut retry = ClientRetry::new();
        loop {
            match read_snapshot(&pool, task_uuid).await {
                Err(e) if retry.again(&e, "reading a task").await => continue,
                read => return read.map_err(db),
            }
        }
    }

    /// Answer the waiters of tasks that may have finished. A task that is gone was finished
    /// and deleted by the retention cleanup: its waiters learn that, rather than nothing.
    async fn answer_waiters(&mut self, candidates: Vec<Uuid>) {
        for task_uuid in candidates {
            if !self.waiters.contains_key(&task_uuid) {
                continue;
            }
            let answer = match self.snapshot(task_uuid).await {
                Ok(Some(snapshot)) if snapshot.status.is_finished() => Ok(snapshot),
                Ok(Some(_)) => continue,
                Ok(None) => Err(deleted_task(task_uuid)),
                Err(e) => {
                    debug!(error = %e, "checking a waited task failed; will check again");
                    self.recheck_waiters = true;
                    continue;
                }
            };
            for waiter in self.waiters.remove(&task_uuid).unwrap_or_default() {
                let _ = waiter.try_send(answer.clone());
            }
        }
    }

    /// Every waited task, in one query: which are finished or gone (then answered).
    async fn check_all_waiters(&mut self) {
        let waited: Vec<Uuid> = self.waiters.keys().copied().collect();
        if waited.is_empty() {
            return;
        }
        let Ok(pool) = self.pool() else { return };
        let rows = sqlx::query(
            "SELECT w.task_uuid FROM unnest($1::uuid[]) AS w(task_uuid)
             LEFT JOIN tasker_tasks t ON t.task_uuid = w.task_uuid
             WHERE t.task_uuid IS NULL OR t.status IN ('complete', 'error', 'cancelled')",
        )
        .bind(&waited)
        .fetch_all(pool)
        .await;
        match rows {
            Ok(rows) => {
                let settled = rows.iter().map(|r| r.get("task_uuid")).collect();
                self.answer_waiters(settled).await;
            }
            Err(e) => {
                debug!(error = %e, "checking waited tasks failed; will check again");
                self.recheck_waiters = true;
            }
        }
    }

    /// Whether waited tasks are due a direct check (rather than waiting for notifications).
    fn checks_waiters(&self) -> bool {
        !self.waiters.is_empty() && (!self.listens() || self.recheck_waiters)
    }

    async fn housekeeping(&mut self, now: Instant) {
        if !self.finished_unanswered.is_empty() {
            let finished = std::mem::take(&mut self.finished_unanswered);
            self.answer_waiters(finished).await;
        }
        // Notifications answer waiters; without them (Polling) or after missing some (the
        // listener reconnected, a check failed), every waited task is checked, in one query.
        if self.checks_waiters() && now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING_EVERY;
            self.recheck_waiters = false;
            self.check_all_waiters().await;
        }
        if now >= self.next_cleanup {
            self.next_cleanup = now + cleanup_every(self.settings.finished_task_ttl);
            self.start_cleanup();
        }
    }

    /// Delete expired finished tasks on a task of its own, looping until none is left, so that
    /// deletion keeps up with any completion rate and never holds up the engine thread.
    fn start_cleanup(&mut self) {
        if self.cleanup.as_ref().is_some_and(|c| !c.is_finished()) {
            return;
        }
        let Ok(pool) = self.pool() else { return };
        let pool = pool.clone();
        let ttl = self.settings.finished_task_ttl.as_secs_f64();
        self.cleanup = Some(tokio::spawn(delete_expired_tasks(pool, ttl)));
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
    /// allowed (its worker died holding the last), or of a task that starts no new step (its
    /// worker died while the task was ending), is not run: the attempt its worker lost is
    /// recorded as timed out instead.
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
        let mut mismatched = Vec::new();
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
            let base = row.get::<i32, _>("attempt_base") as u32;
            let ending: Option<String> = row.get("ending");
            let Some(definition) = template.steps.get(index).map(Arc::clone) else {
                // Only a template changed under the same version gets here (refused at
                // bootstrap since): fail the step, never panic the engine.
                mismatched.push(Entry {
                    flight: InFlight::unknown_step(
                        task_uuid,
                        row.get("step_uuid"),
                        index,
                        attempt,
                        now,
                    ),
                    template: None,
                    effect: Effect::Fail(format!(
                        "the task's template {key} has no step #{index}: the stored template was changed \
                         under the same version"
                    )),
                    metadata: None,
                });
                continue;
            };
            let flight = InFlight::new(
                task_uuid,
                row.get("step_uuid"),
                index,
                &definition,
                attempt,
                now,
            );
            self.owned.insert(
                flight.step_uuid,
                Owned {
                    attempt,
                    base,
                    template: Arc::clone(&template),
                },
            );
            if attempt.saturating_sub(base) > definition.retry.max_attempts || ending.is_some() {
                // The worker holding the last allowed attempt died, or the task is ending (only
                // a step in progress keeps its row then, so its worker died): that attempt
                // failed, and this one does not run.
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
        if !mismatched.is_empty() {
            self.outstanding = self.outstanding.saturating_sub(mismatched.len());
            self.pending.extend(mismatched);
            self.start_write(now);
        }
        if !exhausted.is_empty() {
            let lost = exhausted
                .into_iter()
                .map(|mut f| {
                    f.attempt -= 1;
                    if let Some(owned) = self.owned.get_mut(&f.step_uuid) {
                        owned.attempt = f.attempt;
                    }
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
            self.record_outcomes(lost, now).await;
        }
        Ok(claimed)
    }

    /// Claimed attempts that never ran: the attempt does not count; the step is claimable now,
    /// or, if its task is ending, settled as the ending says (`skipped`, `cancelled`), and the
    /// task finishes if that was its last step in progress.
    async fn release_attempts(&mut self, tasks: Vec<Uuid>, steps: Vec<Uuid>, attempts: Vec<i32>) {
        let Ok(pool) = self.pool().cloned() else {
            return;
        };
        let released = tokio::time::timeout(
            WRITE_TIMEOUT,
            release_transaction(&pool, tasks, &steps, &attempts),
        )
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "releasing took longer than 30s",
            )))
        });
        match released {
            Ok(finished) => {
                self.announce_ended(&finished).await;
                if !finished.is_empty() && !self.waiters.is_empty() {
                    self.answer_waiters(finished).await;
                }
            }
            Err(e) => {
                warn!(error = %e, "releasing unstarted steps failed; they become claimable once their lease expires")
            }
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

    /// A claim failed (the database restarting, a lock timeout): claim again shortly, in every
    /// mode, rather than at the next poll, notification or cleanup.
    fn claim_failed(&mut self, now: Instant) {
        self.maybe_ready = true;
        let at = now + RETRY_WRITE_AFTER;
        self.wake_claim_at = Some(self.wake_claim_at.map_or(at, |w| w.min(at)));
    }

    /// Decide what each outcome does to its step (on the engine thread: templates are here).
    async fn prepare(&mut self, outcomes: Vec<(InFlight, AttemptOutcome)>) -> Vec<Entry> {
        let unknown: Vec<Uuid> = outcomes
            .iter()
            .filter(|(f, _)| {
                self.owned
                    .get(&f.step_uuid)
                    .is_none_or(|o| o.attempt != f.attempt)
            })
            .map(|(f, _)| f.step_uuid)
            .collect();
        let mut found: HashMap<Uuid, (u32, Arc<TaskTemplate>)> = HashMap::new();
        if !unknown.is_empty() {
            match self.templates_of_steps(&unknown).await {
                Ok(steps) => found = steps,
                Err(e) => warn!(error = %e, "looking up the templates of recorded steps failed"),
            }
        }
        let mut entries = Vec::with_capacity(outcomes.len());
        for (flight, outcome) in outcomes {
            let known = match self.owned.get(&flight.step_uuid) {
                Some(o) if o.attempt == flight.attempt => Some((o.base, Arc::clone(&o.template))),
                _ => found.get(&flight.step_uuid).cloned(),
            };
            let Some((base, template)) = known else {
                // Its task is gone (deleted after finishing): there is nothing left to record.
                debug!(task_uuid = %flight.task_uuid, "outcome for a task that no longer exists");
                continue;
            };
            entries.push(entry_for(flight, outcome, template, base));
        }
        entries
    }

    /// The retry base and template of steps this process does not hold the record of.
    async fn templates_of_steps(
        &mut self,
        steps: &[Uuid],
    ) -> EngineResult<HashMap<Uuid, (u32, Arc<TaskTemplate>)>> {
        let rows = sqlx::query(
            "SELECT s.step_uuid, s.attempt_base, t.namespace, t.name, t.version
             FROM tasker_steps s JOIN tasker_tasks t ON t.task_uuid = s.task_uuid WHERE s.step_uuid = ANY($1)",
        )
        .bind(steps)
        .fetch_all(self.pool()?)
        .await
        .map_err(db)?;
        let mut found = HashMap::new();
        for row in rows {
            let key = TemplateKey {
                namespace: row.get("namespace"),
                name: row.get("name"),
                version: row.get("version"),
            };
            let base = row.get::<i32, _>("attempt_base") as u32;
            found.insert(row.get("step_uuid"), (base, self.template(&key).await?));
        }
        Ok(found)
    }

    /// Start a write task for the pending outcomes, unless one runs or a retry is not due yet.
    fn start_write(&mut self, now: Instant) {
        if self.writing || self.pending.is_empty() || self.retry_write_at.is_some_and(|at| now < at)
        {
            return;
        }
        let (Ok(pool), Some(wake)) = (self.pool().cloned(), self.wake.clone()) else {
            return;
        };
        self.retry_write_at = None;
        // The transaction also claims what this worker has room for: always when something may
        // be ready, else only if its own outcomes make successors ready. That room is reserved
        // until it ends, so that claims meanwhile do not take it too.
        let may_find = self.claim_room(now) > 0;
        let room = if self.stopping {
            0
        } else {
            self.settings.max_in_flight.saturating_sub(self.outstanding)
        };
        let claim = Claim {
            room,
            even_if_nothing_readied: may_find,
        };
        self.outstanding += room;
        self.writing = true;
        let entries = std::mem::take(&mut self.pending);
        // After outcomes had to wait for another session's row locks, write without waiting
        // for locks until everything has been written: a paused worker may hold them for a while.
        let locking = if self.contended {
            Locking::SkipLocked
        } else {
            Locking::Wait
        };
        let scope = Arc::clone(&self.scope);
        let results = self.write_results_sender.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            let done = write_outcomes(pool, scope, entries, claim, locking).await;
            if let Some(metrics) = metrics {
                metrics.observe_commit(began.elapsed());
            }
            if results.send(done).is_ok() {
                let _ = wake.send(Notification::BackendWorkDone);
            }
        });
    }

    /// Hand outcomes to the write task (at once while shutting down: the engine stops once
    /// nothing is in flight).
    async fn record_outcomes(&mut self, outcomes: Vec<(InFlight, AttemptOutcome)>, now: Instant) {
        self.outstanding = self.outstanding.saturating_sub(outcomes.len());
        let entries = self.prepare(outcomes).await;
        self.pending.extend(entries);
        self.start_write(now);
        if self.stopping {
            // Shutting down: the engine stops once nothing is in flight, so finish the write
            // first, retrying a failed one for a little while (a database restarting).
            self.wait_for_write(now).await;
            for _ in 0..SHUTDOWN_WRITE_RETRIES {
                let Some(at) = self.retry_write_at.filter(|_| !self.pending.is_empty()) else {
                    break;
                };
                tokio::time::sleep_until(at.into()).await;
                self.start_write(Instant::now());
                self.wait_for_write(Instant::now()).await;
            }
        }
    }

    /// Attempts claimed ahead (in a record transaction) for tasks that have since stopped
    /// starting steps go back unstarted: settled as their task's ending says.
    async fn release_halted_prefetched(&mut self) {
        if self.halted_prefetched.is_empty() {
            return;
        }
        let halted: HashSet<Uuid> = self.halted_prefetched.drain(..).collect();
        if self.prefetched.is_empty() {
            return;
        }
        let (back, keep): (Vec<PgRow>, Vec<PgRow>) = std::mem::take(&mut self.prefetched)
            .into_iter()
            .partition(|r| halted.contains(&r.get::<Uuid, _>("task_uuid")));
        self.prefetched = keep;
        if back.is_empty() {
            return;
        }
        self.outstanding = self.outstanding.saturating_sub(back.len());
        let tasks = back.iter().map(|r| r.get::<Uuid, _>("task_uuid")).collect();
        let steps = back.iter().map(|r| r.get::<Uuid, _>("step_uuid")).collect();
        let attempts = back.iter().map(|r| r.get::<i32, _>("attempts")).collect();
        self.release_attempts(tasks, steps, attempts).await;
    }

    /// Every third of the lease, extend the lease of every attempt this process holds (queued
    /// for Ruby, running, timed out or cancelled with its handler still running, claimed ahead,
    /// or waiting for its outcome to be written), in one UPDATE on a task of its own. The same
    /// statement tells which of those attempts' tasks were cancelled: a cancel reaches this
    /// process within one renewal even without LISTEN (Polling).
    fn renew_leases(&mut self, now: Instant) {
        if now < self.next_renewal {
            return;
        }
        let every = renewal_every(self.settings.claim_lease);
        self.next_renewal = now + every;
        if self.renewal.as_ref().is_some_and(|r| !r.is_finished()) {
            return;
        }
        let mut steps = Vec::with_capacity(self.owned.len() + self.prefetched.len());
        let mut attempts = Vec::with_capacity(steps.capacity());
        for (step, owned) in &self.owned {
            steps.push(*step);
            attempts.push(owned.attempt as i32);
        }
        for row in &self.prefetched {
            steps.push(row.get::<Uuid, _>("step_uuid"));
            attempts.push(row.get::<i32, _>("attempts"));
        }
        if steps.is_empty() {
            return;
        }
        let (Ok(pool), Some(wake)) = (self.pool().cloned(), self.wake.clone()) else {
            return;
        };
        let lease = self.scope.lease_secs;
        self.renewal = Some(tokio::spawn(renew_leases(
            pool, steps, attempts, lease, every, wake,
        )));
    }

    /// Take the results of finished write tasks.
    async fn take_write_results(&mut self, now: Instant) {
        while let Ok(done) = self.write_results.try_recv() {
            self.finish_write(done, now).await;
        }
    }

    async fn finish_write(&mut self, done: WriteDone, now: Instant) {
        self.writing = false;
        for (step, attempt) in &done.recorded {
            if self.owned.get(step).is_some_and(|o| o.attempt == *attempt) {
                self.owned.remove(step);
            }
        }
        self.halted.extend(&done.halted);
        self.halted_prefetched.extend(done.halted);
        self.contended = done.deferred > 0;
        if !done.kept.is_empty() {
            warn!(
                outcomes = done.kept.len(),
                reason = done.kept_because.as_deref().unwrap_or("unknown"),
                "recording outcomes failed; they are kept and retried"
            );
            self.pending.splice(0..0, done.kept);
            self.retry_write_at = Some(now + RETRY_WRITE_AFTER);
        }
        if done.readiness.readied || done.readiness.retried {
            self.maybe_ready = true;
        }
        self.outstanding = self.outstanding.saturating_sub(done.reserved);
        if done.claim_lost {
            // The claim was rolled back with the write: claim again shortly.
            self.claim_failed(now);
        } else if done.claim_ran {
            if let Ok(pool) = self.pool().cloned() {
                let got = done.claimed.len();
                self.claimed(&pool, done.reserved, got, now).await;
            }
            self.prefetched.extend(done.claimed);
        }
        self.announce_ended(&done.finished).await;
        if !self.waiters.is_empty() {
            self.answer_waiters(done.finished).await;
        }
    }

    /// Announce the tasks this process just finished (its records, a cancel, a release, a
    /// retry with nothing left to run) while something observes task ends. Each task's end is
    /// announced once, by the process whose transaction finished it, in the order they
    /// finished. The reads run here, on the engine's thread, and only while observed.
    async fn announce_ended(&self, finished: &[Uuid]) {
        if finished.is_empty() || !self.settings.announce_ends.load(Ordering::Acquire) {
            return;
        }
        let Ok(pool) = self.pool() else {
            return;
        };
        for &task_uuid in finished {
            let mut retry = ClientRetry::new();
            let read = loop {
                match read_snapshot(pool, task_uuid).await {
                    Err(e) if retry.again(&e, "reading a finished task").await => continue,
                    read => break read,
                }
            };
            match read {
                Ok(Some(snapshot)) => {
                    let _ = self.settings.task_ends.send(snapshot);
                }
                // Deleted already: a finished_task_ttl shorter than this read took.
                Ok(None) => {}
                Err(e) => warn!(
                    task_uuid = %task_uuid,
                    error = %e,
                    "reading a finished task failed: its task event is not published"
                ),
            }
        }
    }

    /// Wait for the running write task, if any, and take its results.
    async fn wait_for_write(&mut self, now: Instant) {
        while self.writing {
            match self.write_results.recv().await {
                Some(done) => self.finish_write(done, now).await,
                None => break,
            }
        }
    }
}

impl Backend for PostgresBackend {
    async fn start(&mut self, inbox: NotificationSender) -> EngineResult<()> {
        let masked = mask_url(&self.settings.url);
        let options = connect_options(&self.settings.url, &self.settings.worker_id)
            .map_err(|e| EngineError::Bootstrap(format!("invalid database_url {masked}: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(self.settings.pool_size)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options.clone())
            .await
            .map_err(|e| {
                EngineError::Bootstrap(format!("cannot connect to PostgreSQL at {masked}: {e}"))
            })?;
        migrate(&pool, &masked).await?;
        self.pool = Some(pool);
        self.store_templates().await?;
        if self.listens() {
            tokio::spawn(listen(options, inbox.clone()));
        }
        let (creator, requests) = unbounded_channel();
        self.creator = Some(creator);
        // A quarter of the pool (1 to 4 connections) commits new tasks; the rest claims and records.
        let transactions = (self.settings.pool_size as usize / 4).clamp(1, 4);
        self.creator_task = Some(tokio::spawn(create_in_groups(
            self.pool()?.clone(),
            requests,
            inbox.clone(),
            transactions,
        )));
        self.wake = Some(inbox);
        info!(mode = self.settings.mode.as_str(), "postgres backend ready");
        debug!(url = %masked, "postgres backend connected");
        Ok(())
    }

    async fn create_tasks(
        &mut self,
        key: TemplateKey,
        template: Option<Arc<TaskTemplate>>,
        contexts: Vec<Value>,
        run_at: Option<SystemTime>,
        reply: CreatedReply,
    ) {
        let template = match template {
            Some(t) => t,
            None => match self.template(&key).await {
                Ok(t) => t,
                Err(e) => {
                    let _ = reply.try_send(Err(e));
                    return;
                }
            },
        };
        let request = CreateRequest {
            rows: NewTaskRows::new(&template, contexts, run_at),
            reply,
        };
        match &self.creator {
            Some(creator) => {
                if let Err(unsent) = creator.send(request) {
                    let _ = unsent.0.reply.try_send(Err(EngineError::ShuttingDown));
                }
            }
            None => {
                let _ = request.reply.try_send(Err(EngineError::Internal(
                    "postgres backend used before start".into(),
                )));
            }
        }
    }

    async fn task_status(&mut self, task_uuid: Uuid) -> EngineResult<TaskSnapshot> {
        self.snapshot(task_uuid)
            .await?
            .ok_or_else(|| deleted_task(task_uuid))
    }

    async fn wait_for_task(&mut self, task_uuid: Uuid, reply: SnapshotReply) {
        match self.snapshot(task_uuid).await {
            Ok(Some(snapshot)) if snapshot.status.is_finished() => {
                let _ = reply.try_send(Ok(snapshot));
            }
            Ok(Some(_)) => self.waiters.entry(task_uuid).or_default().push(reply),
            Ok(None) => {
                let _ = reply.try_send(Err(deleted_task(task_uuid)));
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

    async fn cancel_task(&mut self, task_uuid: Uuid) -> EngineResult<bool> {
        let pool = self.pool()?.clone();
        let mut retry = ClientRetry::new();
        let cancelled = loop {
            let attempt = tokio::time::timeout(WRITE_TIMEOUT, cancel_transaction(&pool, task_uuid))
                .await
                .unwrap_or_else(|_| {
                    Err(TxFailure::Before(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "cancelling took longer than 30s",
                    ))))
                });
            match attempt {
                Ok(cancel) => break cancel,
                Err(TxFailure::Before(e)) if retry.again(&e, "cancelling a task").await => {}
                Err(TxFailure::Before(e)) => return Err(db(e)),
                Err(TxFailure::AtCommit(e)) => {
                    return Err(EngineError::Internal(format!(
                        "postgres: the connection failed while committing the cancel of task {task_uuid}, so \
                         whether it was cancelled is unknown (task_status tells; cancelling again is safe): {e}"
                    )))
                }
            }
        };
        match cancelled {
            Cancel::Unknown => Err(deleted_task(task_uuid)),
            Cancel::AlreadyFinished => Ok(false),
            Cancel::Cancelled { finished } => {
                // Attempts claimed in a record transaction and not yet handed out go back too.
                self.halted_prefetched.push(task_uuid);
                if finished {
                    self.announce_ended(&[task_uuid]).await;
                }
                if finished && self.waiters.contains_key(&task_uuid) {
                    self.answer_waiters(vec![task_uuid]).await;
                }
                Ok(true)
            }
        }
    }

    async fn retry_task(&mut self, task_uuid: Uuid) -> EngineResult<()> {
        let pool = self.pool()?.clone();
        let mut tx = pool.begin().await.map_err(db)?;
        let Some(task) = sqlx::query(
            "SELECT namespace, name, version, status FROM tasker_tasks WHERE task_uuid = $1 FOR UPDATE",
        )
        .bind(task_uuid)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
        else {
            return Err(deleted_task(task_uuid));
        };
        let status = task_status(task.get("status"));
        if !matches!(status, TaskStatus::Error | TaskStatus::Cancelled) {
            return Err(EngineError::config(format!(
                "task {task_uuid} is {}: only a task that ended in error or was cancelled can be retried",
                if status.is_finished() {
                    status.as_str()
                } else {
                    "still running"
                }
            )));
        }
        let key = TemplateKey {
            namespace: task.get("namespace"),
            name: task.get("name"),
            version: task.get("version"),
        };
        let template = self.template(&key).await?;
        let steps = sqlx::query(
            "SELECT step_uuid, step_index, status FROM tasker_steps WHERE task_uuid = $1 ORDER BY step_index",
        )
        .bind(task_uuid)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let complete: HashSet<usize> = steps
            .iter()
            .filter(|r| r.get::<&str, _>("status") == "complete")
            .map(|r| r.get::<i32, _>("step_index") as usize)
            .collect();
        let mut again = Vec::new();
        let mut waiting = Vec::new();
        let mut ready = Vec::new();
        let mut ready_timeouts = Vec::new();
        for row in &steps {
            let index = row.get::<i32, _>("step_index") as usize;
            if complete.contains(&index) {
                continue;
            }
            let Some(deps) = template.dependencies.get(index) else {
                return Err(EngineError::config(format!(
                    "task {task_uuid} cannot be retried: its template {key} has no step #{index} (the stored \
                     template was changed under the same version)"
                )));
            };
            let step_uuid: Uuid = row.get("step_uuid");
            let waiting_on = deps.iter().filter(|d| !complete.contains(d)).count();
            again.push(step_uuid);
            waiting.push(waiting_on as i32);
            if waiting_on == 0 {
                ready.push(step_uuid);
                ready_timeouts.push(ms(template.steps[index].timeout));
            }
        }
        // Each step gets its retry budget again, counted from the attempts it has had so far.
        sqlx::query(
            "UPDATE tasker_steps s
             SET status = CASE WHEN i.waiting_on = 0 THEN 'enqueued' ELSE 'pending' END,
                 waiting_on = i.waiting_on, attempt_base = s.attempts, ready_at = now()
             FROM unnest($1::uuid[], $2::int4[]) AS i(step_uuid, waiting_on)
             WHERE s.step_uuid = i.step_uuid",
        )
        .bind(&again)
        .bind(&waiting)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "INSERT INTO tasker_ready_steps (step_uuid, task_uuid, namespace, timeout_ms)
             SELECT u, $2, $3, ms FROM unnest($1::uuid[], $4::int4[]) AS x(u, ms)
             ON CONFLICT (step_uuid) DO UPDATE SET visible_at = now(), claimed_by = NULL",
        )
        .bind(&ready)
        .bind(task_uuid)
        .bind(&key.namespace)
        .bind(&ready_timeouts)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        // A cancelled task whose every step completed anyway (successes that came after the
        // cancel) has nothing left to run: it is complete at once.
        let nothing_left = again.is_empty();
        sqlx::query(
            "UPDATE tasker_tasks
             SET status = CASE WHEN $2 THEN 'complete' ELSE 'in_progress' END, ending = NULL,
                 finished_at = CASE WHEN $2 THEN now() END
             WHERE task_uuid = $1",
        )
        .bind(task_uuid)
        .bind(nothing_left)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if nothing_left {
            notify_finished(&mut tx, &[task_uuid]).await.map_err(db)?;
        } else {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(STEPS_READY)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        self.maybe_ready = true;
        if nothing_left {
            self.announce_ended(&[task_uuid]).await;
        }
        Ok(())
    }

    async fn tick(&mut self, now: Instant) {
        self.take_write_results(now).await;
        self.release_halted_prefetched().await;
        if !self.halted.is_empty() {
            // Halted by this process's writes since the last `record`: the engine withdraws
            // their queued attempts (a NOTIFY does it too, but Polling workers do not listen).
            if let Some(wake) = &self.wake {
                let tasks = std::mem::take(&mut self.halted);
                let _ = wake.send(Notification::TasksHalted {
                    tasks,
                    cancelled: false,
                });
            }
        }
        self.renew_leases(now);
        self.housekeeping(now).await;
        self.start_write(now);
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
            // Bounded: a connection that died silently must not hold up the engine thread.
            let claim = tokio::time::timeout(WRITE_TIMEOUT, claim_rows(&pool, &self.scope, room));
            let fresh = claim.await.unwrap_or_else(|_| {
                Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "claiming took longer than 30s",
                )))
            });
            match fresh.map_err(db) {
                Ok(fresh) => {
                    self.claimed(&pool, room, fresh.len(), now).await;
                    rows.extend(fresh);
                }
                Err(e) => {
                    self.claim_failed(now);
                    if rows.is_empty() {
                        return Err(e);
                    }
                    warn!(error = %e, "claiming ready steps failed; will retry");
                }
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
                self.claim_failed(now);
                Err(e)
            }
        }
    }

    async fn record(
        &mut self,
        outcomes: Vec<(InFlight, AttemptOutcome)>,
        now: Instant,
    ) -> EngineResult<Vec<Uuid>> {
        self.record_outcomes(outcomes, now).await;
        self.take_write_results(now).await;
        Ok(std::mem::take(&mut self.halted))
    }

    async fn release(&mut self, unstarted: Vec<InFlight>) {
        self.outstanding = self.outstanding.saturating_sub(unstarted.len());
        for flight in &unstarted {
            if self
                .owned
                .get(&flight.step_uuid)
                .is_some_and(|o| o.attempt == flight.attempt)
            {
                self.owned.remove(&flight.step_uuid);
            }
        }
        let tasks: Vec<Uuid> = unstarted.iter().map(|f| f.task_uuid).collect();
        let steps: Vec<Uuid> = unstarted.iter().map(|f| f.step_uuid).collect();
        let attempts: Vec<i32> = unstarted.iter().map(|f| f.attempt as i32).collect();
        self.release_attempts(tasks, steps, attempts).await;
    }
    async fn finish_creating(&mut self) {
        // Every caller sent before the stop is answered: no transaction is cut off by the runtime's end.
        self.creator = None;
        if let Some(task) = self.creator_task.take() {
            let _ = task.await;
        }
    }

    async fn stop_claiming(&mut self) {
        self.stopping = true;
        // A running write may be claiming: take its rows before handing back what is held.
        self.wait_for_write(Instant::now()).await;
        if self.prefetched.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.prefetched);
        self.outstanding = self.outstanding.saturating_sub(held.len());
        let tasks = held.iter().map(|r| r.get::<Uuid, _>("task_uuid")).collect();
        let steps = held.iter().map(|r| r.get::<Uuid, _>("step_uuid")).collect();
        let attempts = held.iter().map(|r| r.get::<i32, _>("attempts")).collect();
        self.release_attempts(tasks, steps, attempts).await;
    }

    async fn resume_claiming(&mut self) {
        self.stopping = false;
        // Steps may have become ready while nothing was claimed: look at once.
        self.maybe_ready = true;
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let poll = if self.polls() { self.next_poll } else { None };
        let waiters = self.checks_waiters().then_some(self.next_housekeeping);
        let retry_write = (!self.writing).then_some(self.retry_write_at).flatten();
        let renewal =
            (!self.owned.is_empty() || !self.prefetched.is_empty()).then_some(self.next_renewal);
        [
            renewal,
            poll,
            self.wake_claim_at,
            retry_write,
            waiters,
            Some(self.next_cleanup),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn notify(&mut self, notification: Notification) {
        match notification {
            Notification::StepsReady => self.maybe_ready = true,
            Notification::Reconnected => {
                // Whatever was announced while the listener was away is checked directly.
                self.maybe_ready = true;
                self.recheck_waiters = true;
                self.next_housekeeping = Instant::now();
            }
            Notification::TasksFinished(tasks) => self
                .finished_unanswered
                .extend(tasks.into_iter().filter(|t| self.waiters.contains_key(t))),
            // The engine withdrew what it had queued; what this backend holds goes back on the next tick.
            Notification::TasksHalted { tasks, .. } => self.halted_prefetched.extend(tasks),
            // Taken on the next tick.
            Notification::BackendWorkDone => {}
        }
    }

    async fn list_tasks(&mut self, query: TaskQuery) -> EngineResult<TaskPage> {
        crate::task_list::postgres_page(self.pool()?, &query).await
    }

    fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = Some(metrics);
    }

    fn pool_stats(&self) -> (u32, u32) {
        self.pool
            .as_ref()
            .map_or((0, 0), |p| (p.size(), p.num_idle() as u32))
    }
}

/// How often the leases of the attempts out here are renewed: three renewals per lease, so that
/// two may fail (the database restarting) before another process may take a step over.
fn renewal_every(lease: Duration) -> Duration {
    lease / 3
}

/// Finished tasks are deleted at start, then every minute, or every `finished_task_ttl` when that
/// is shorter (so a short TTL is honoured within about twice its length).
fn cleanup_every(ttl: Duration) -> Duration {
    CLEANUP_EVERY.min(ttl).max(Duration::from_millis(100))
}

/// Delete finished tasks older than `ttl_secs`, a batch at a time until none is left. Workers
/// running it at once take different rows (`SKIP LOCKED`).
async fn delete_expired_tasks(pool: PgPool, ttl_secs: f64) {
    let started = Instant::now();
    let mut deleted = 0;
    loop {
        let batch = sqlx::query(
            "DELETE FROM tasker_tasks WHERE task_uuid IN (
               SELECT task_uuid FROM tasker_tasks
               WHERE finished_at < now() - make_interval(secs => $1)
               ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(ttl_secs)
        .bind(CLEANUP_BATCH)
        .execute(&pool)
        .await;
        match batch {
            Ok(done) => {
                deleted += done.rows_affected();
                if done.rows_affected() < CLEANUP_BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, "deleting old finished tasks failed; will try again at the next cleanup");
                break;
            }
        }
    }
    if deleted > 0 {
        info!(
            deleted,
            seconds = started.elapsed().as_secs_f64(),
            "deleted finished tasks older than finished_task_ttl"
        );
    }
}

/// The most tasks one creation transaction takes from the callers waiting for one.
const CREATE_GROUP_TASKS: usize = 10_000;

/// One `create_tasks` call, waiting for its tasks to be committed.
struct CreateRequest {
    rows: NewTaskRows,
    reply: CreatedReply,
}

/// The rows of new tasks: one call's, or a group's (appended), inserted with three statements
/// whatever their number or templates.
#[derive(Default)]
struct NewTaskRows {
    task_uuids: Vec<Uuid>,
    contexts: Vec<Value>,
    namespaces: Vec<String>,
    names: Vec<String>,
    versions: Vec<String>,
    step_counts: Vec<i32>,
    step_uuids: Vec<Uuid>,
    step_tasks: Vec<Uuid>,
    step_indices: Vec<i32>,
    step_names: Vec<String>,
    step_waiting: Vec<i32>,
    /// When each step's task may start (seconds since the epoch; `None`: now).
    step_run_at: Vec<Option<f64>>,
    root_uuids: Vec<Uuid>,
    root_tasks: Vec<Uuid>,
    root_namespaces: Vec<String>,
    root_timeouts: Vec<i32>,
    root_run_at: Vec<Option<f64>>,
}

impl NewTaskRows {
    /// One task per context of `template`, each with uuids of its own (chosen here, so that a
    /// retried transaction can tell whether an earlier try committed).
    fn new(template: &TaskTemplate, contexts: Vec<Value>, run_at: Option<SystemTime>) -> Self {
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
            root_namespaces: vec![template.namespace.clone(); tasks * roots.len()],
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
                rows.root_timeouts.push(ms(template.steps[i].timeout));
            }
        }
        rows
    }

    fn append(&mut self, other: &Self) {
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
async fn create_in_groups(
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
async fn create_group(pool: &PgPool, group: Vec<CreateRequest>) {
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
            let result = result.map_err(|e| e.to_string());
            for request in &group {
                let _ = request.reply.try_send(match &result {
                    Ok(()) => Ok(request.rows.task_uuids.clone()),
                    Err(e) => Err(EngineError::Internal(format!("postgres: {e}"))),
                });
            }
        }
    }
}

fn answer_create(request: &CreateRequest, result: Result<(), sqlx::Error>) {
    let _ = request
        .reply
        .try_send(result.map(|()| request.rows.task_uuids.clone()).map_err(db));
}

/// Insert `rows` in one transaction. A connection the server closed (a terminated session, a
/// restart) fails the transaction before anything is written, and it is tried again. A failure
/// at COMMIT leaves the outcome unknown: the next try first looks for the tasks (their uuids were
/// chosen beforehand), so a task is never created twice.
async fn insert_tasks(pool: &PgPool, rows: &NewTaskRows) -> Result<(), sqlx::Error> {
    let mut retry = ClientRetry::new();
    let mut look_first = false;
    loop {
        let attempt = async {
            if look_first && tasks_exist(pool, &rows.task_uuids).await? {
                return Ok(());
            }
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO tasker_tasks (task_uuid, namespace, name, version, context, status, incomplete_steps)
                 SELECT u, ns, nm, v, c, 'pending', n
                 FROM unnest($1::uuid[], $2::jsonb[], $3::text[], $4::text[], $5::text[], $6::int4[])
                      AS x(u, c, ns, nm, v, n)",
            )
            .bind(&rows.task_uuids)
            .bind(&rows.contexts)
            .bind(&rows.namespaces)
            .bind(&rows.names)
            .bind(&rows.versions)
            .bind(&rows.step_counts)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO tasker_steps (step_uuid, task_uuid, step_index, name, status, waiting_on, ready_at)
                 SELECT u, t, i, nm,
                        CASE WHEN w = 0 AND coalesce(to_timestamp(ra) <= now(), true) THEN 'enqueued'
                             ELSE 'pending' END, w,
                        CASE WHEN w = 0 THEN greatest(now(), coalesce(to_timestamp(ra), now())) END
                 FROM unnest($1::uuid[], $2::uuid[], $3::int4[], $4::text[], $5::int4[], $6::float8[])
                      AS x(u, t, i, nm, w, ra)",
            )
            .bind(&rows.step_uuids)
            .bind(&rows.step_tasks)
            .bind(&rows.step_indices)
            .bind(&rows.step_names)
            .bind(&rows.step_waiting)
            .bind(&rows.step_run_at)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO tasker_ready_steps (step_uuid, task_uuid, namespace, timeout_ms, visible_at)
                 SELECT u, t, ns, ms, greatest(now(), coalesce(to_timestamp(ra), now()))
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::float8[]) AS x(u, t, ns, ms, ra)",
            )
            .bind(&rows.root_uuids)
            .bind(&rows.root_tasks)
            .bind(&rows.root_namespaces)
            .bind(&rows.root_timeouts)
            .bind(&rows.root_run_at)
            .execute(&mut *tx)
            .await?;
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(STEPS_READY)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if retry.again(&e, "creating tasks").await => look_first = true,
            Err(e) => return Err(e),
        }
    }
}

/// How long a client call (create, status, wait, cancel) keeps trying after the connection it
/// used was closed by the server (a terminated session, a restart, a failover): sqlx drops such a
/// connection, and the next try gets a new one. A restarting server is back within about this long;
/// after it the call raises, naming the cause.
const CLIENT_RETRY_FOR: Duration = Duration::from_secs(3);

/// The pauses between the tries of one client call.
struct ClientRetry {
    give_up: Instant,
    pause: Duration,
}

impl ClientRetry {
    fn new() -> Self {
        Self {
            give_up: Instant::now() + CLIENT_RETRY_FOR,
            pause: Duration::from_millis(10),
        }
    }

    /// Whether `e` is worth another try (the connection or the server, not the statement), and
    /// there is time left for one; then waits before it.
    async fn again(&mut self, e: &sqlx::Error, what: &str) -> bool {
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
enum TxFailure {
    Before(sqlx::Error),
    AtCommit(sqlx::Error),
}

impl From<sqlx::Error> for TxFailure {
    fn from(e: sqlx::Error) -> Self {
        Self::Before(e)
    }
}

/// Whether the tasks of one `create_tasks` transaction were committed (all or none were).
async fn tasks_exist(pool: &PgPool, task_uuids: &[Uuid]) -> Result<bool, sqlx::Error> {
    let Some(first) = task_uuids.first() else {
        return Ok(false);
    };
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tasker_tasks WHERE task_uuid = $1)")
        .bind(first)
        .fetch_one(pool)
        .await
}

/// A task and its steps as the database has them now (`None`: no such task).
async fn read_snapshot(
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
fn deleted_task(task_uuid: Uuid) -> EngineError {
    EngineError::UnknownTask(format!(
        "{task_uuid}: no such task in the database (finished tasks are deleted after finished_task_ttl)"
    ))
}

/// The template's content, whatever its formatting and comments: its YAML as JSON with sorted keys.
fn template_content(yaml: &str) -> Option<String> {
    let value: Value = serde_norway::from_str(yaml).ok()?;
    Some(sorted(value).to_string())
}

fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Where in `value` a NUL character sits (jsonb cannot store one), as a path like `$.a[2]`.
fn nul_in(value: &Value) -> Option<String> {
    fn walk(value: &Value, path: &mut String) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().enumerate().any(|(i, v)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(v, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            Value::Object(map) => map.iter().any(|(k, v)| {
                let len = path.len();
                path.push('.');
                path.push_str(&k.replace('\0', "\\u0000"));
                let found = k.contains('\0') || walk(v, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut path = String::from("$");
    walk(value, &mut path).then_some(path)
}

/// PostgreSQL text cannot hold NUL: written as the six characters `\u0000` instead.
fn storable_text(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\\u0000")
    } else {
        text
    }
}

/// What an outcome does to its step: complete it, retry it after a delay, or fail it for good.
/// `base`: the step's attempts before its task was last retried (its retry budget counts from
/// there).
fn entry_for(
    flight: InFlight,
    outcome: AttemptOutcome,
    template: Arc<TaskTemplate>,
    base: u32,
) -> Entry {
    let Some(policy) = template
        .steps
        .get(flight.step_index)
        .map(|s| s.retry.clone())
    else {
        let message = format!(
            "the task's template {} has no step #{}: the stored template was changed under the same version",
            template.key(),
            flight.step_index
        );
        return Entry {
            flight,
            template: None,
            effect: Effect::Fail(message),
            metadata: None,
        };
    };
    let (retryable, retry_after, message, metadata) = match outcome {
        // A handler that returned a success after its task was cancelled: the step is complete.
        AttemptOutcome::Completed(c) | AttemptOutcome::Cancelled(Some(c)) if c.success => {
            let unstorable = nul_in(&c.result)
                .map(|path| ("result", path))
                .or_else(|| nul_in(&c.metadata).map(|path| ("metadata", path)));
            let (effect, metadata) = match unstorable {
                None => (Effect::Complete(c.result), Some(c.metadata)),
                Some((part, path)) => (Effect::Fail(unstorable_message(part, &path)), None),
            };
            return Entry {
                flight,
                template: Some(template),
                effect,
                metadata,
            };
        }
        AttemptOutcome::Completed(c) => {
            let mut message = c.failure_message();
            let metadata = match nul_in(&c.metadata) {
                None => Some(c.metadata),
                Some(path) => {
                    // The failure itself is what matters: it is recorded, and says why its
                    // metadata is missing.
                    message = format!("{message} ({})", unstorable_message("metadata", &path));
                    None
                }
            };
            (c.retryable, c.retry_after, message, metadata)
        }
        AttemptOutcome::TimedOut => (true, None, flight.timeout_message(), None),
        // Its task was cancelled: never retried (the step becomes `cancelled`).
        AttemptOutcome::Cancelled(reported) => {
            let message = match reported {
                Some(c) => format!("cancelled while running ({})", c.failure_message()),
                None => "cancelled while running".to_string(),
            };
            (false, None, message, None)
        }
    };
    let message = storable_text(message);
    let used = flight.attempt.saturating_sub(base);
    let effect = if retryable && policy.retryable && used < policy.max_attempts {
        Effect::Retry {
            delay_ms: delay_ms(retry_after.unwrap_or_else(|| policy.delay_after(used))),
            message,
        }
    } else if !retryable || !policy.retryable {
        Effect::Fail(message)
    } else {
        Effect::Fail(format!("{message} (gave up after {used} attempts)"))
    };
    Entry {
        flight,
        template: Some(template),
        effect,
        metadata,
    }
}

/// Why a step's `part` (its result or metadata) cannot be stored: the NUL at `path`.
fn unstorable_message(part: &str, path: &str) -> String {
    format!(
        "the step's {part} cannot be stored in PostgreSQL: it contains a NUL character (\\u0000) at {path}, \
         which jsonb does not accept"
    )
}

/// Whether a failed write may succeed unchanged later: the connection or the server is in
/// trouble, or a lock or serialization conflict. Anything else (a value the database rejects)
/// would fail forever, and is isolated instead.
fn is_transient(e: &sqlx::Error) -> bool {
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

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Locking {
    /// Wait for row locks (up to `lock_timeout`).
    Wait,
    /// Write only the outcomes of tasks whose rows no other session holds; defer the rest.
    SkipLocked,
}

/// What one transaction did.
#[derive(Default)]
struct Written {
    /// Indices (into the entries) deferred because another session holds their task's row.
    deferred: Vec<usize>,
    finished: Vec<Uuid>,
    halted: Vec<Uuid>,
    readiness: Readiness,
    claim_ran: bool,
    claimed: Vec<PgRow>,
}

/// The claim a record transaction makes after its writes.
#[derive(Clone, Copy)]
struct Claim {
    room: usize,
    /// Claim even when the outcomes made no successor ready (something else may be ready).
    even_if_nothing_readied: bool,
}

impl Claim {
    const NONE: Claim = Claim {
        room: 0,
        even_if_nothing_readied: false,
    };
}

/// The write task: record `entries` (and claim as `claim` says), isolating what cannot be stored.
async fn write_outcomes(
    pool: PgPool,
    scope: Arc<ClaimScope>,
    mut entries: Vec<Entry>,
    claim: Claim,
    locking: Locking,
) -> WriteDone {
    let mut done = WriteDone {
        reserved: claim.room,
        ..WriteDone::default()
    };
    let all: Vec<usize> = (0..entries.len()).collect();
    let mut result = write_transaction(&pool, &scope, &entries, &all, claim, locking).await;
    if locking == Locking::Wait
        && result
            .as_ref()
            .is_err_and(|e| sqlstate(e).as_deref() == Some("55P03"))
    {
        // Another session holds a row (a worker paused mid-transaction): record everything
        // else now rather than wait for it.
        result = write_transaction(&pool, &scope, &entries, &all, claim, Locking::SkipLocked).await;
    }
    done.claim_lost = result.is_err() && claim.room > 0;
    match result {
        Ok(written) => {
            done.claim_ran = written.claim_ran;
            done.absorb(written, &entries, &all);
        }
        Err(e) if is_transient(&e) => done.keep(&entries, &all, &e),
        Err(e) => {
            warn!(error = %e, outcomes = entries.len(), "a batch of outcomes cannot be stored; isolating the outcome at fault");
            isolate(&pool, &scope, &mut entries, all, &mut done).await;
        }
    }
    done
}

/// Write `subset` in halves until each failing outcome is alone; an outcome that the database
/// refuses on its own fails its step with the database's reason, and nothing else is held up.
async fn isolate(
    pool: &PgPool,
    scope: &ClaimScope,
    entries: &mut [Entry],
    subset: Vec<usize>,
    done: &mut WriteDone,
) {
    let mut chunks = vec![subset];
    while let Some(chunk) = chunks.pop() {
        match write_transaction(pool, scope, entries, &chunk, Claim::NONE, Locking::Wait).await {
            Ok(written) => done.absorb(written, entries, &chunk),
            Err(e) if is_transient(&e) => done.keep(entries, &chunk, &e),
            Err(e) if chunk.len() > 1 => {
                let (left, right) = chunk.split_at(chunk.len() / 2);
                chunks.push(right.to_vec());
                chunks.push(left.to_vec());
                debug!(error = %e, "a part of a batch cannot be stored; splitting it");
            }
            Err(e) => {
                let entry = &mut entries[chunk[0]];
                error!(error = %e, step_uuid = %entry.flight.step_uuid, attempt = entry.flight.attempt,
                       "the database refuses this step's outcome; the step fails");
                entry.effect = Effect::Fail(storable_text(format!(
                    "the step's outcome cannot be stored in PostgreSQL: {e}"
                )));
                // It may be what the database refused.
                entry.metadata = None;
                match write_transaction(pool, scope, entries, &chunk, Claim::NONE, Locking::Wait)
                    .await
                {
                    Ok(written) => done.absorb(written, entries, &chunk),
                    Err(e) => done.keep(entries, &chunk, &e),
                }
            }
        }
    }
}

impl WriteDone {
    fn absorb(&mut self, written: Written, entries: &[Entry], subset: &[usize]) {
        let deferred: HashSet<usize> = written.deferred.iter().copied().collect();
        for &i in subset {
            if deferred.contains(&i) {
                self.kept.push(entries[i].clone());
            } else {
                self.recorded
                    .push((entries[i].flight.step_uuid, entries[i].flight.attempt));
            }
        }
        self.deferred += deferred.len();
        if !deferred.is_empty() {
            self.kept_because = Some(format!(
                "{} outcomes wait for rows another session holds",
                deferred.len()
            ));
        }
        self.finished.extend(written.finished);
        self.halted.extend(written.halted);
        self.readiness.readied |= written.readiness.readied;
        self.readiness.retried |= written.readiness.retried;
        self.claimed.extend(written.claimed);
    }

    fn keep(&mut self, entries: &[Entry], subset: &[usize], e: &sqlx::Error) {
        self.kept.extend(subset.iter().map(|&i| entries[i].clone()));
        self.kept_because = Some(e.to_string());
    }
}

/// One transaction: the outcomes of `subset`, then a claim. Deadlocks and serialization
/// failures are retried at once, a few times.
async fn write_transaction(
    pool: &PgPool,
    scope: &ClaimScope,
    entries: &[Entry],
    subset: &[usize],
    claim: Claim,
    locking: Locking,
) -> Result<Written, sqlx::Error> {
    let mut tries = 0;
    loop {
        let attempt = tokio::time::timeout(
            WRITE_TIMEOUT,
            write_once(pool, scope, entries, subset, claim, locking),
        )
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the transaction took longer than {}s",
                    WRITE_TIMEOUT.as_secs()
                ),
            )))
        });
        match attempt {
            Err(e) if tries < 3 && sqlstate(&e).is_some_and(|c| c == "40P01" || c == "40001") => {
                tries += 1;
            }
            other => return other,
        }
    }
}

async fn write_once(
    pool: &PgPool,
    scope: &ClaimScope,
    entries: &[Entry],
    subset: &[usize],
    claim: Claim,
    locking: Locking,
) -> Result<Written, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut written = Written::default();
    let mut writing: Vec<usize> = subset.to_vec();
    // The tasks' rows first, in one order: every writer takes locks task rows first, then steps.
    let mut tasks: Vec<Uuid> = subset
        .iter()
        .map(|&i| entries[i].flight.task_uuid)
        .collect();
    tasks.sort();
    tasks.dedup();
    let lock = match locking {
        Locking::Wait => {
            "SELECT task_uuid, ending FROM tasker_tasks WHERE task_uuid = ANY($1) ORDER BY task_uuid FOR UPDATE"
        }
        Locking::SkipLocked => {
            "SELECT task_uuid, ending FROM tasker_tasks WHERE task_uuid = ANY($1) ORDER BY task_uuid
             FOR UPDATE SKIP LOCKED"
        }
    };
    // Each locked task's ending (None while it runs normally).
    let endings: HashMap<Uuid, Option<String>> = sqlx::query_as::<_, (Uuid, Option<String>)>(lock)
        .bind(&tasks)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    if locking == Locking::SkipLocked {
        // A task that no longer exists needs no lock: its outcomes change nothing.
        let existing: HashSet<Uuid> =
            sqlx::query_scalar("SELECT task_uuid FROM tasker_tasks WHERE task_uuid = ANY($1)")
                .bind(&tasks)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let (now, later): (Vec<usize>, Vec<usize>) = writing.into_iter().partition(|&i| {
            let task = entries[i].flight.task_uuid;
            endings.contains_key(&task) || !existing.contains(&task)
        });
        writing = now;
        written.deferred = later;
    }
    let (finished, halted, readiness) = write_entries(&mut tx, entries, &writing, &endings).await?;
    let claims = claim.room > 0 && (claim.even_if_nothing_readied || readiness.readied);
    let claimed = if claims {
        claim_rows(&mut *tx, scope, claim.room).await?
    } else {
        Vec::new()
    };
    // Other workers need a NOTIFY only for what this one did not take: a retry falling due
    // later, or ready steps beyond its room. One per batch (NOTIFY takes a global lock at commit).
    let left_over = readiness.readied && (!claims || claimed.len() == claim.room);
    if readiness.retried || left_over {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(STEPS_READY)
            .execute(&mut *tx)
            .await?;
    }
    notify_halted(&mut tx, &halted, false).await?;
    notify_finished(&mut tx, &finished).await?;
    tx.commit().await?;
    written.finished = finished;
    written.halted = halted;
    written.readiness = readiness;
    written.claim_ran = claims;
    written.claimed = claimed;
    Ok(written)
}

/// Record the outcomes `subset` of `entries` inside `tx`, whose tasks are locked with their
/// `endings`. Returns the tasks that finished, and those that a step failing for good halted.
async fn write_entries(
    tx: &mut Transaction<'static, Postgres>,
    entries: &[Entry],
    subset: &[usize],
    endings: &HashMap<Uuid, Option<String>>,
) -> Result<(Vec<Uuid>, Vec<Uuid>, Readiness), sqlx::Error> {
    // Lock rows in one order in every transaction, so concurrent batches cannot deadlock.
    // One entry per attempt: an attempt is recorded once however often it was handed over.
    let mut ordered: Vec<&Entry> = subset.iter().map(|&i| &entries[i]).collect();
    ordered.sort_by_key(|e| (e.flight.task_uuid, e.flight.step_index, e.flight.attempt));
    ordered.dedup_by_key(|e| (e.flight.step_uuid, e.flight.attempt));

    let mut ok_steps = Vec::new();
    let mut ok_attempts = Vec::new();
    let mut ok_results = Vec::new();
    let mut ok_metadata = Vec::new();
    let mut edges = Edges::default();
    let mut retry_steps = Vec::new();
    let mut retry_attempts = Vec::new();
    let mut retry_delays = Vec::new();
    let mut retry_messages = Vec::new();
    let mut retry_metadata = Vec::new();
    let mut fail_steps = Vec::new();
    let mut fail_attempts = Vec::new();
    let mut fail_messages = Vec::new();
    let mut fail_metadata = Vec::new();
    let mut fail_statuses = Vec::new();

    for entry in ordered {
        let flight = &entry.flight;
        let ending = endings.get(&flight.task_uuid).and_then(|e| e.as_deref());
        // A task that is ending retries nothing: the failure is kept, the step settled as its
        // task's ending says.
        let fail_status = if ending == Some("cancelled") {
            "cancelled"
        } else {
            "error"
        };
        match &entry.effect {
            Effect::Complete(result) => {
                ok_steps.push(flight.step_uuid);
                ok_attempts.push(flight.attempt as i32);
                ok_results.push(result);
                ok_metadata.push(entry.metadata.as_ref());
                // The successors this completion counts toward (applied only if this very
                // attempt is the step's current one).
                if let Some(template) = &entry.template {
                    for &next in &template.dependents[flight.step_index] {
                        edges.src.push(flight.step_uuid);
                        edges.src_attempt.push(flight.attempt as i32);
                        edges.task.push(flight.task_uuid);
                        edges.index.push(next as i32);
                        edges.timeout.push(ms(template.steps[next].timeout));
                        edges.namespace.push(template.namespace.clone());
                    }
                }
            }
            Effect::Retry { message, .. } | Effect::Fail(message)
                if ending.is_some() || matches!(entry.effect, Effect::Fail(_)) =>
            {
                fail_steps.push(flight.step_uuid);
                fail_attempts.push(flight.attempt as i32);
                fail_messages.push(message.as_str());
                fail_metadata.push(entry.metadata.as_ref());
                fail_statuses.push(fail_status);
            }
            Effect::Retry { delay_ms, message } => {
                retry_steps.push(flight.step_uuid);
                retry_attempts.push(flight.attempt as i32);
                retry_delays.push(*delay_ms);
                retry_messages.push(message.as_str());
                retry_metadata.push(entry.metadata.as_ref());
            }
            Effect::Fail(_) => unreachable!("failures are taken by the arm above"),
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
            .bind(&edges.src)
            .bind(&edges.task)
            .bind(&edges.index)
            .bind(&edges.timeout)
            .bind(&edges.namespace)
            .bind(&edges.src_attempt)
            .bind(&ok_metadata)
            .fetch_all(&mut **tx)
            .await?;
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
               SELECT * FROM unnest($1::uuid[], $2::int4[], $3::int8[], $4::text[], $5::jsonb[])
                 AS i(step_uuid, attempt, delay_ms, message, metadata)
             ), upd AS (
               UPDATE tasker_steps s
               SET status = 'waiting_for_retry', error_message = i.message, metadata = i.metadata,
                   completed_at = now(), ready_at = now() + make_interval(secs => i.delay_ms / 1000.0)
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
        .bind(&retry_metadata)
        .execute(&mut **tx)
        .await?;
        readiness.retried = true;
    }

    let mut halted = Vec::new();
    if !fail_steps.is_empty() {
        let rows = sqlx::query(
            "WITH input AS (
               SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::jsonb[], $5::text[])
                 AS i(step_uuid, attempt, message, metadata, status)
             ), failed AS (
               UPDATE tasker_steps s
               SET status = i.status, error_message = i.message, metadata = i.metadata, completed_at = now()
               FROM input i
               WHERE s.step_uuid = i.step_uuid AND s.attempts = i.attempt AND s.status = 'in_progress'
               RETURNING s.step_uuid, s.task_uuid
             ), gone AS (
               DELETE FROM tasker_ready_steps r USING failed f WHERE r.step_uuid = f.step_uuid
             )
             SELECT task_uuid FROM failed",
        )
        .bind(&fail_steps)
        .bind(&fail_attempts)
        .bind(&fail_messages)
        .bind(&fail_metadata)
        .bind(&fail_statuses)
        .fetch_all(&mut **tx)
        .await?;
        // A step failed for good in a task that was running normally: the task starts no new step.
        let mut failing: Vec<Uuid> = rows
            .iter()
            .map(|r| r.get::<Uuid, _>("task_uuid"))
            .filter(|t| endings.get(t).is_some_and(|e| e.is_none()))
            .collect();
        failing.sort();
        failing.dedup();
        halted = halt_tasks(tx, &failing, "error").await?;
    }

    // Tasks that are ending finish once none of their steps is in progress.
    let ending: Vec<Uuid> = endings
        .iter()
        .filter(|(_, e)| e.is_some())
        .map(|(t, _)| *t)
        .chain(halted.iter().copied())
        .collect();
    finished.extend(settle_tasks(tx, &ending).await?);
    Ok((finished, halted, readiness))
}

/// Successor edges of the completions in one batch, column by column.
#[derive(Default)]
struct Edges {
    src: Vec<Uuid>,
    /// The attempt of the completion the edge comes from: only the step's current attempt counts.
    src_attempt: Vec<i32>,
    task: Vec<Uuid>,
    index: Vec<i32>,
    timeout: Vec<i32>,
    namespace: Vec<String>,
}

async fn notify_finished(
    tx: &mut Transaction<'static, Postgres>,
    finished: &[Uuid],
) -> Result<(), sqlx::Error> {
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
            .await?;
    }
    Ok(())
}

/// Announce tasks that stopped starting steps, so that the processes holding their attempts
/// withdraw the queued ones (and, for a cancel, interrupt the running ones).
async fn notify_halted(
    tx: &mut Transaction<'static, Postgres>,
    tasks: &[Uuid],
    cancelled: bool,
) -> Result<(), sqlx::Error> {
    let kind = if cancelled { "cancelled" } else { "error" };
    for chunk in tasks.chunks(200) {
        let payload = chunk
            .iter()
            .map(Uuid::to_string)
            .collect::<Vec<_>>()
            .join(",");
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(TASKS_HALTED)
            .bind(format!("{kind}:{payload}"))
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// A `tasker_tasks_halted` payload: the tasks, and whether they were cancelled.
fn parse_halted(payload: &str) -> (Vec<Uuid>, bool) {
    let (kind, uuids) = payload.split_once(':').unwrap_or(("error", payload));
    let tasks = uuids
        .split(',')
        .filter_map(|s| Uuid::parse_str(s).ok())
        .collect();
    (tasks, kind == "cancelled")
}

/// Stop `tasks` starting steps (their row locked by the caller): `ending` is `error` or
/// `cancelled` (a cancel outranks a failure still winding down; nothing outranks a cancel). Their
/// steps that have not started become `skipped` (`cancelled`) and leave the hot table. Returns
/// the tasks whose ending this set.
async fn halt_tasks(
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
async fn settle_tasks(
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
async fn lock_tasks(
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

/// Hand back claimed attempts that never ran (see `PostgresBackend::release_attempts`).
/// Returns the tasks that finished.
async fn release_transaction(
    pool: &PgPool,
    mut tasks: Vec<Uuid>,
    steps: &[Uuid],
    attempts: &[i32],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_tasks(&mut tx, &mut tasks).await?;
    sqlx::query(
        "WITH input AS (SELECT * FROM unnest($1::uuid[], $2::int4[]) AS i(step_uuid, attempt)),
         back AS (
           UPDATE tasker_steps s
           SET attempts = s.attempts - 1, started_at = NULL,
               status = CASE t.ending WHEN 'cancelled' THEN 'cancelled' WHEN 'error' THEN 'skipped' ELSE 'enqueued' END
           FROM input i, tasker_tasks t
           WHERE s.step_uuid = i.step_uuid AND s.attempts = i.attempt AND s.status = 'in_progress'
             AND t.task_uuid = s.task_uuid
           RETURNING s.step_uuid, s.status
         ), visible AS (
           UPDATE tasker_ready_steps r SET visible_at = now(), claimed_by = NULL
           FROM back WHERE r.step_uuid = back.step_uuid AND back.status = 'enqueued'
         ), gone AS (
           DELETE FROM tasker_ready_steps r USING back
           WHERE r.step_uuid = back.step_uuid AND back.status <> 'enqueued'
         )
         SELECT count(*) FROM back",
    )
    .bind(steps)
    .bind(attempts)
    .execute(&mut *tx)
    .await?;
    let finished = settle_tasks(&mut tx, &tasks).await?;
    notify_finished(&mut tx, &finished).await?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(STEPS_READY)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(finished)
}

/// What a cancel found.
enum Cancel {
    Unknown,
    AlreadyFinished,
    /// `finished`: no step was in progress, so the task is `cancelled` already.
    Cancelled {
        finished: bool,
    },
}

/// Cancel a task in one transaction, its row locked first: a completion of one of its steps is
/// recorded wholly before or wholly after.
async fn cancel_transaction(pool: &PgPool, task_uuid: Uuid) -> Result<Cancel, TxFailure> {
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

/// Extend the lease of the attempts (`steps`, `attempts`) still current; tell the engine which
/// of their tasks were cancelled. Rows another session holds are skipped (it is recording them).
async fn renew_leases(
    pool: PgPool,
    steps: Vec<Uuid>,
    attempts: Vec<i32>,
    lease_secs: f64,
    within: Duration,
    wake: NotificationSender,
) {
    let renewal = sqlx::query_scalar::<_, Uuid>(
        "WITH owned AS (
           SELECT r.step_uuid FROM unnest($1::uuid[], $2::int4[]) AS o(step_uuid, attempt)
           JOIN tasker_steps s ON s.step_uuid = o.step_uuid AND s.attempts = o.attempt AND s.status = 'in_progress'
           JOIN tasker_ready_steps r ON r.step_uuid = o.step_uuid
           ORDER BY r.step_uuid
           FOR UPDATE OF r SKIP LOCKED
         ), renewed AS (
           UPDATE tasker_ready_steps r SET visible_at = now() + make_interval(secs => $3)
           FROM owned WHERE r.step_uuid = owned.step_uuid
           RETURNING r.task_uuid
         )
         SELECT DISTINCT t.task_uuid FROM renewed JOIN tasker_tasks t ON t.task_uuid = renewed.task_uuid
         WHERE t.ending = 'cancelled'",
    )
    .bind(&steps)
    .bind(&attempts)
    .bind(lease_secs)
    .fetch_all(&pool);
    match tokio::time::timeout(within.max(Duration::from_millis(100)), renewal).await {
        Ok(Ok(cancelled)) => {
            if !cancelled.is_empty() {
                let _ = wake.send(Notification::TasksHalted {
                    tasks: cancelled,
                    cancelled: true,
                });
            }
        }
        Ok(Err(e)) => {
            warn!(error = %e, attempts = steps.len(), "renewing the claim lease failed; will try again")
        }
        Err(_) => warn!(
            attempts = steps.len(),
            "renewing the claim lease took longer than the renewal interval; will try again"
        ),
    }
}

/// The pool's and the listener's connection options: the URL's, plus the session settings and
/// an `application_name` naming the worker (visible in `pg_stat_activity`).
fn connect_options(url: &str, worker_id: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let mut options = PgConnectOptions::from_str(url)?.options(SESSION_SETTINGS.iter().copied());
    if options.get_application_name().is_none() {
        options = options.application_name(&format!("tasker {worker_id}"));
    }
    Ok(options)
}

/// Bring the schema up to this build's migrations. Migrations applied by a newer build are
/// left alone (they are additive) unless that build declared the schema closed to older ones.
async fn migrate(pool: &PgPool, masked: &str) -> EngineResult<()> {
    let migrator = migrator();
    // sqlx serialises concurrent migrators with an advisory lock: simultaneous bootstraps are safe.
    migrator.run(pool).await.map_err(|e| {
        EngineError::Bootstrap(format!("migrating the schema at {masked} failed: {e}"))
    })?;
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    let required: i64 =
        sqlx::query_scalar("SELECT min_migration FROM tasker_schema_compat WHERE id")
            .fetch_one(pool)
            .await
            .map_err(|e| {
                EngineError::Bootstrap(format!(
                    "reading the schema's compatibility at {masked} failed: {e}"
                ))
            })?;
    if known < required {
        return Err(EngineError::Bootstrap(format!(
            "the database schema at {masked} needs a build that knows migration {required} or later (this build \
             knows up to {known}): a newer release changed the schema in a way older builds cannot use; run \
             this worker's newer release"
        )));
    }
    let newer: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE version > $1 AND success")
            .bind(known)
            .fetch_one(pool)
            .await
            .unwrap_or(0);
    if newer > 0 {
        info!(
            newer_migrations = newer,
            "the schema has additive migrations newer than this build; running against it"
        );
    }
    Ok(())
}

/// LISTEN on a connection of its own (never one of the pool's, so that a pool of one still
/// has a connection for work), forwarding notifications to the engine. A connection that has
/// been quiet for `LISTENER_HEARTBEAT` is asked `SELECT 1`; one that does not answer within
/// `LISTENER_HEARTBEAT_TIMEOUT` died silently (a NAT or firewall dropped it without a FIN) and
/// is replaced. After a replacement the engine hears `Reconnected`: it claims and checks its
/// waiters, since notifications may have been missed.
async fn listen(options: PgConnectOptions, inbox: NotificationSender) {
    let mut first = true;
    loop {
        let mut listener = match connect_listener(&options).await {
            Ok(listener) => listener,
            Err(e) => {
                warn!(error = %e, "the LISTEN connection cannot connect; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if !first && inbox.send(Notification::Reconnected).is_err() {
            return;
        }
        first = false;
        loop {
            let message = match tokio::time::timeout(LISTENER_HEARTBEAT, listener.try_recv()).await
            {
                Ok(Ok(Some(n))) if n.channel() == STEPS_READY => Notification::StepsReady,
                Ok(Ok(Some(n))) if n.channel() == TASKS_HALTED => {
                    let (tasks, cancelled) = parse_halted(n.payload());
                    Notification::TasksHalted { tasks, cancelled }
                }
                Ok(Ok(Some(n))) => Notification::TasksFinished(
                    n.payload()
                        .split(',')
                        .filter_map(|s| Uuid::parse_str(s).ok())
                        .collect(),
                ),
                Ok(Ok(None)) => {
                    warn!("the LISTEN connection closed; reconnecting");
                    break;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "the LISTEN connection failed; reconnecting");
                    break;
                }
                Err(_quiet) => {
                    let check = sqlx::query("SELECT 1").execute(&mut listener);
                    match tokio::time::timeout(LISTENER_HEARTBEAT_TIMEOUT, check).await {
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => warn!(error = %e, "the LISTEN connection failed a heartbeat; reconnecting"),
                        Err(_) => warn!(
                            "the LISTEN connection did not answer a heartbeat within {}s; reconnecting",
                            LISTENER_HEARTBEAT_TIMEOUT.as_secs()
                        ),
                    }
                    break;
                }
            };
            if inbox.send(message).is_err() {
                return;
            }
        }
        drop(listener);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn connect_listener(options: &PgConnectOptions) -> Result<PgListener, sqlx::Error> {
    let connect = async {
        // A pool of one: the listener's own connection, re-established on demand.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(options.clone())
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener
            .listen_all([STEPS_READY, TASKS_FINISHED, TASKS_HALTED])
            .await?;
        Ok(listener)
    };
    tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting took longer than 10s",
            )))
        })
}

/// Record successful attempts ($1 steps, $2 attempts, $3 results, $10 metadata) and their effects: each edge
/// ($4 completed step, $9 its attempt → $5 task, $6 successor index, $7 its timeout, $8
/// namespace) of a current completion counts toward that successor, once. Returns ("done",
/// step) per current completion, ("ready", step) per successor made ready, ("finished", task)
/// per task now complete.
const COMPLETE_SQL: &str = "WITH input AS (
       SELECT * FROM unnest($1::uuid[], $2::int4[], $3::jsonb[], $10::jsonb[]) AS i(step_uuid, attempt, result, metadata)
     ), done AS (
       UPDATE tasker_steps s
       SET status = 'complete', result = i.result, metadata = i.metadata, error_message = NULL, completed_at = now()
       FROM input i
       WHERE s.step_uuid = i.step_uuid AND s.attempts = i.attempt AND s.status = 'in_progress'
       RETURNING s.step_uuid, s.task_uuid, s.attempts
     ), gone AS (
       DELETE FROM tasker_ready_steps r USING done d WHERE r.step_uuid = d.step_uuid
     ), dec AS (
       SELECT e.task_uuid, e.step_index, count(*)::int4 AS n, min(e.timeout_ms) AS timeout_ms,
              min(e.namespace) AS namespace
       FROM unnest($4::uuid[], $5::uuid[], $6::int4[], $7::int4[], $8::text[], $9::int4[])
              AS e(src, task_uuid, step_index, timeout_ms, namespace, src_attempt)
       JOIN done d ON d.step_uuid = e.src AND d.attempts = e.src_attempt
       GROUP BY e.task_uuid, e.step_index
     ), upd AS (
       UPDATE tasker_steps s
       SET waiting_on = s.waiting_on - d.n,
           status = CASE WHEN s.waiting_on - d.n = 0 AND t.ending IS NULL AND s.status = 'pending'
                         THEN 'enqueued' ELSE s.status END,
           ready_at = CASE WHEN s.waiting_on - d.n = 0 THEN now() ELSE s.ready_at END
       FROM dec d JOIN tasker_tasks t ON t.task_uuid = d.task_uuid
       WHERE s.task_uuid = d.task_uuid AND s.step_index = d.step_index
       RETURNING s.step_uuid, s.task_uuid, s.waiting_on, s.status, d.timeout_ms, d.namespace
     ), ready AS (
       INSERT INTO tasker_ready_steps (step_uuid, task_uuid, namespace, timeout_ms)
       SELECT step_uuid, task_uuid, namespace, timeout_ms FROM upd
       WHERE waiting_on = 0 AND status = 'enqueued'
       ON CONFLICT (step_uuid) DO NOTHING
       RETURNING step_uuid
     ), fin AS (
       UPDATE tasker_tasks t
       SET incomplete_steps = t.incomplete_steps - f.n,
           status = CASE WHEN t.incomplete_steps - f.n = 0 AND t.ending IS NULL THEN 'complete'
                         WHEN t.status = 'pending' THEN 'in_progress' ELSE t.status END,
           finished_at = CASE WHEN t.incomplete_steps - f.n = 0 AND t.ending IS NULL THEN now()
                              ELSE t.finished_at END
       FROM (SELECT task_uuid, count(*)::int4 AS n FROM done GROUP BY task_uuid) f
       WHERE t.task_uuid = f.task_uuid
       RETURNING t.task_uuid, t.status
     )
     SELECT 'done' AS kind, step_uuid AS id FROM done
     UNION ALL SELECT 'ready', step_uuid FROM ready
     UNION ALL SELECT 'finished', task_uuid FROM fin WHERE status = 'complete'";

/// Claim up to $2 ready steps of namespaces $1 for worker $3: visibility pushed forward by the
/// lease ($4 seconds), attempt counted, task marked in progress. Returns what events are built
/// from, with the task's `ending`: a row of an ending task is claimable only once the worker that
/// ran its step died (see `build_events`).
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

async fn claim_rows<'e, E>(
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

/// A timestamp column read as nanoseconds since the Unix epoch (the snapshot's unit).
fn unix_ns(row: &PgRow, column: &str) -> Option<u64> {
    row.get::<Option<i64>, _>(column)
        .and_then(|ns| u64::try_from(ns).ok())
}

fn db(e: sqlx::Error) -> EngineError {
    EngineError::Internal(format!("postgres: {e}"))
}

fn task_status(s: &str) -> TaskStatus {
    match s {
        "in_progress" => TaskStatus::InProgress,
        "complete" => TaskStatus::Complete,
        "error" => TaskStatus::Error,
        "cancelled" => TaskStatus::Cancelled,
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
        "skipped" => StepStatus::Skipped,
        "cancelled" => StepStatus::Cancelled,
        _ => StepStatus::Pending,
    }
}

/// The URL with every password replaced by `****`, for messages and logs: the userinfo's (even
/// one holding a raw `@`, `/` or `?`) and any `password`-like query parameter.
pub fn mask_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // The userinfo ends at the last `@` before the query: a raw `@` in a password comes earlier.
    let query_at = |s: &str| s.find('?').unwrap_or(s.len());
    let at = rest[..query_at(rest)]
        .rfind('@')
        .or_else(|| rest.rfind('@').filter(|&i| !rest[i..].contains('=')));
    let (userinfo, after) = match at {
        Some(i) => rest.split_at(i),
        None => ("", rest),
    };
    let userinfo = match userinfo.find(':') {
        Some(colon) => format!("{}:****", &userinfo[..colon]),
        None => userinfo.to_string(),
    };
    let (location, query) = after.split_at(query_at(after));
    let query = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.to_ascii_lowercase().contains("password") => {
                format!("{key}=****")
            }
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{scheme}{userinfo}{location}{query}")
}

fn ms(d: Duration) -> i32 {
    d.as_millis().min(i32::MAX as u128) as i32
}

/// A retry delay in ms: up to `MAX_RETRY_AFTER` (a year), more than an `int4` of ms holds.
fn delay_ms(d: Duration) -> i64 {
    d.min(MAX_RETRY_AFTER).as_millis() as i64
}

/// What a batch of outcomes made claimable.
#[derive(Default)]
struct Readiness {
    /// Successors became ready now.
    readied: bool,
    /// Steps will be ready again after their backoff.
    retried: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_in_every_form() {
        for (url, masked) in [
            (
                "postgres://app:s3cret@db:5432/x",
                "postgres://app:****@db:5432/x",
            ),
            ("postgres://app@db/x", "postgres://app@db/x"),
            ("postgres://db/x", "postgres://db/x"),
            ("postgres://app:p@ss@db/x", "postgres://app:****@db/x"),
            ("postgres://app:a/b?c@db/x", "postgres://app:****@db/x"),
            (
                "postgres://db/x?password=s3cret",
                "postgres://db/x?password=****",
            ),
            (
                "postgres://app@db/x?sslmode=require&Password=s3cret&application_name=a@b",
                "postgres://app@db/x?sslmode=require&Password=****&application_name=a@b",
            ),
            (
                "postgresql://app:s3cret@db/x?sslpassword=k3y",
                "postgresql://app:****@db/x?sslpassword=****",
            ),
        ] {
            assert_eq!(mask_url(url), masked, "{url}");
        }
    }

    fn completion(success: bool, result: Value, metadata: Value) -> AttemptOutcome {
        AttemptOutcome::Completed(Box::new(crate::events::StepExecutionCompletionEvent {
            event_id: Uuid::new_v4(),
            task_uuid: Uuid::new_v4(),
            step_uuid: Uuid::new_v4(),
            success,
            result,
            metadata,
            error_message: (!success).then(|| "boom".to_string()),
            error_class: (!success).then(|| "RuntimeError".to_string()),
            retryable: true,
            retry_after: None,
            completed_at: None,
        }))
    }

    fn entry(outcome: AttemptOutcome) -> Entry {
        let template = TaskTemplate::from_yaml(
            "namespace: ns\nname: t\nversion: 1.0.0\nsteps:\n  - name: only\n    handler: { callable: H }\n    \
             retry: { max_attempts: 2 }\n",
            std::path::Path::new("t.yml"),
        )
        .expect("template");
        let flight = InFlight::new(
            Uuid::new_v4(),
            Uuid::new_v4(),
            0,
            &template.steps[0],
            1,
            Instant::now(),
        );
        entry_for(flight, outcome, Arc::new(template), 0)
    }

    #[test]
    fn keeps_metadata_of_successes_and_failures_but_not_a_nul() {
        let meta = serde_json::json!({"region": "eu"});
        let ok = entry(completion(true, serde_json::json!(1), meta.clone()));
        assert!(matches!(ok.effect, Effect::Complete(_)));
        assert_eq!(ok.metadata.as_ref(), Some(&meta));

        let failed = entry(completion(false, Value::Null, meta.clone()));
        assert!(matches!(failed.effect, Effect::Retry { .. }));
        assert_eq!(failed.metadata.as_ref(), Some(&meta));

        assert_eq!(entry(AttemptOutcome::TimedOut).metadata, None);

        // A success whose metadata cannot be stored fails, saying where the NUL is.
        let nul = serde_json::json!({"note": ["x\u{0}"]});
        let bad_success = entry(completion(true, serde_json::json!(1), nul.clone()));
        assert_eq!(bad_success.metadata, None);
        match bad_success.effect {
            Effect::Fail(message) => {
                assert!(message.contains("metadata") && message.contains("$.note[0]"))
            }
            _ => panic!("a success with a NUL in its metadata must fail"),
        }
        // A failure is still recorded as itself (retried here), without the metadata, and says so.
        let bad_failure = entry(completion(false, Value::Null, nul));
        assert_eq!(bad_failure.metadata, None);
        match bad_failure.effect {
            Effect::Retry { message, .. } => {
                assert!(
                    message.starts_with("RuntimeError: boom (the step's metadata cannot be stored")
                );
                assert!(message.contains("$.note[0]"));
            }
            _ => panic!("a retryable failure stays retryable"),
        }
    }

    #[test]
    fn finds_nul_characters_in_results() {
        let value = serde_json::json!({"a": [1, "ok", {"b": "x\u{0}y"}]});
        assert_eq!(nul_in(&value).as_deref(), Some("$.a[2].b"));
        assert_eq!(nul_in(&serde_json::json!({"a": "fine"})), None);
        assert_eq!(
            nul_in(&serde_json::json!({"k\u{0}": 1})).as_deref(),
            Some("$.k\\u0000")
        );
    }

    #[test]
    fn template_content_ignores_formatting_and_comments() {
        let a = "# a comment\nname: x\nversion: '1'\nsteps: [{name: a}]\n";
        let b = "version: \"1\"\nsteps:\n  - name: a\nname: x\n";
        let c = "name: x\nversion: '1'\nsteps: [{name: b}]\n";
        assert_eq!(template_content(a), template_content(b));
        assert_ne!(template_content(a), template_content(c));
    }

    #[test]
    fn only_what_retrying_can_cure_is_transient() {
        let io = sqlx::Error::Io(std::io::Error::other("reset"));
        assert!(is_transient(&io));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
    }
}
