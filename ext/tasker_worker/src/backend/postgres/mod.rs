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
//! - A worker claims ahead of its handler threads about 50 ms of work at the rate it finishes
//!   steps (`ClaimAhead`): with fast steps each transaction carries many claims and completions,
//!   with slow ones little more than one step per thread is held, the rest left to other workers.
//!   An attempt's timeout runs from when a thread takes it; one that waited a whole timeout for a
//!   thread is released unrun (the engine's sweep), for any worker to claim.
//! - Wake-ups: LISTEN/NOTIFY (EventDriven), a periodic claim (Polling), or both (Hybrid). One
//!   NOTIFY per transaction at most, and only for steps the sender did not claim itself.
//!   EventDriven workers also wake when the earliest hidden row becomes visible (a retry's
//!   backoff, an expired claim), and every mode claims once at start. The LISTEN connection is
//!   its own (not one of the pool's) and is checked with a query whenever it has been quiet
//!   for a few seconds: a connection that died silently is replaced.
//!
//! This file holds the [`Backend`] impl, the settings and the state; the rest is by concern:
//! `schema` (migrations, stored templates), `create` (task creation in groups), `claims`
//! (claiming, leases, releasing), `records` (deciding outcomes on the engine thread), `write`
//! (the record transaction), `client` (client calls' retries, cancel), `statements` (SQL several
//! transactions share), `snapshot` (reading tasks back) and `listen` (LISTEN/NOTIFY). Each imports
//! from this file and from the ones listed after it, never back.

mod claims;
mod client;
mod create;
mod listen;
mod records;
mod schema;
mod snapshot;
mod statements;
mod write;

use super::{Backend, CreatedReply, Notification, NotificationSender, SnapshotReply};
use crate::attempt::{AttemptOutcome, InFlight};
use crate::config::DeploymentMode;
use crate::error::{EngineError, EngineResult};
use crate::events::{StepExecutionEvent, TaskSnapshot, TaskStatus};
use crate::metrics::Metrics;
use crate::task_list::{TaskPage, TaskQuery};
use crate::template::{TaskTemplate, TemplateKey, TemplateRegistry};
use claims::{renewal_every, ClaimAhead};
use client::{cancel_transaction, Cancel, ClientRetry, RetryFailure, TxFailure};
use create::{create_in_groups, CreateRequest, NewTaskRows};
use listen::{listen, STEPS_READY};
use schema::migrate;
use serde_json::Value;
use snapshot::{deleted_task, read_snapshot, task_status};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use statements::{claim_rows, notify_finished};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use uuid::Uuid;
use write::{Entry, WriteDone, WRITE_TIMEOUT};

/// How long a failed write (or claim) waits before it is tried again (the database may be restarting).
const RETRY_WRITE_AFTER: Duration = Duration::from_millis(250);

/// Polling mode has no notifications: waited tasks are checked this often (one query for all).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

const CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// Finished tasks deleted per statement by the retention cleanup (which loops until none is left).
const CLEANUP_BATCH: i64 = 5000;

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
    /// Fewest and most attempts claimed and not yet recorded or released (running or queued for
    /// Ruby) that this worker may hold; between the two, it follows how fast steps finish
    /// ([`ClaimAhead`]).
    pub min_in_flight: usize,
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
    /// How many of those it may hold now.
    claim_ahead: ClaimAhead,
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
    /// `retry_task` in one transaction, the task's row locked first; whether nothing was left to
    /// run (the task is complete at once). A failure before COMMIT wrote nothing: it may be tried
    /// again.
    async fn retry_transaction(&mut self, task_uuid: Uuid) -> Result<bool, RetryFailure> {
        let pool = self.pool()?.clone();
        let mut tx = pool.begin().await?;
        let Some(task) = sqlx::query(
            "SELECT namespace, name, version, status FROM tasker_tasks WHERE task_uuid = $1 FOR UPDATE",
        )
        .bind(task_uuid)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Err(deleted_task(task_uuid).into());
        };
        let status = task_status(task.get("status"));
        if !matches!(status, TaskStatus::Error | TaskStatus::Cancelled) {
            return Err(RetryFailure::Engine(EngineError::config(format!(
                "task {task_uuid} is {}: only a task that ended in error or was cancelled can be retried",
                if status.is_finished() {
                    status.as_str()
                } else {
                    "still running"
                }
            ))));
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
        .await?;
        let complete: HashSet<usize> = steps
            .iter()
            .filter(|r| r.get::<&str, _>("status") == "complete")
            .map(|r| r.get::<i32, _>("step_index") as usize)
            .collect();
        let mut again = Vec::new();
        let mut waiting = Vec::new();
        let mut ready = Vec::new();
        let mut ready_timeouts = Vec::new();
        let mut ready_namespaces = Vec::new();
        for row in &steps {
            let index = row.get::<i32, _>("step_index") as usize;
            if complete.contains(&index) {
                continue;
            }
            let Some(deps) = template.dependencies.get(index) else {
                return Err(RetryFailure::Engine(EngineError::config(format!(
                    "task {task_uuid} cannot be retried: its template {key} has no step #{index} (the stored \
                     template was changed under the same version)"
                ))));
            };
            let step_uuid: Uuid = row.get("step_uuid");
            let waiting_on = deps.iter().filter(|d| !complete.contains(d)).count();
            again.push(step_uuid);
            waiting.push(waiting_on as i32);
            if waiting_on == 0 {
                ready.push(step_uuid);
                ready_timeouts.push(ms(template.steps[index].timeout));
                ready_namespaces.push(template.steps[index].namespace.as_str());
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
        .await?;
        sqlx::query(
            "INSERT INTO tasker_ready_steps (step_uuid, task_uuid, namespace, timeout_ms)
             SELECT u, $2, ns, ms FROM unnest($1::uuid[], $3::text[], $4::int4[]) AS x(u, ns, ms)
             ON CONFLICT (step_uuid) DO UPDATE SET visible_at = now(), claimed_by = NULL",
        )
        .bind(&ready)
        .bind(task_uuid)
        .bind(&ready_namespaces)
        .bind(&ready_timeouts)
        .execute(&mut *tx)
        .await?;
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
        .await?;
        if nothing_left {
            notify_finished(&mut tx, &[task_uuid]).await?;
        } else {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(STEPS_READY)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit()
            .await
            .map_err(|e| RetryFailure::Tx(TxFailure::AtCommit(e)))?;
        Ok(nothing_left)
    }

    pub fn new(settings: PostgresSettings, local: Arc<TemplateRegistry>) -> Self {
        let templates = local.iter().map(|t| (t.key(), Arc::clone(t))).collect();
        let scope = Arc::new(ClaimScope {
            namespaces: settings.namespaces.clone(),
            worker_id: settings.worker_id.clone(),
            lease_secs: settings.claim_lease.as_secs_f64(),
        });
        let (write_results_sender, write_results) = unbounded_channel();
        let now = Instant::now();
        let claim_ahead = ClaimAhead::new(settings.min_in_flight, settings.max_in_flight, now);
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
            claim_ahead,
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
}

impl Backend for PostgresBackend {
    async fn start(&mut self, inbox: NotificationSender) -> EngineResult<()> {
        let masked = mask_url(&self.settings.url);
        let options = connect_options(&self.settings.url, &self.settings.worker_id)
            .map_err(|e| EngineError::start_failed(format!("invalid database_url {masked}"), e))?;
        let pool = PgPoolOptions::new()
            .max_connections(self.settings.pool_size)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options.clone())
            .await
            .map_err(|e| {
                EngineError::start_failed(format!("cannot connect to PostgreSQL at {masked}"), e)
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
            let attempt = within(
                WRITE_TIMEOUT,
                "cancelling",
                cancel_transaction(&pool, task_uuid),
            )
            .await;
            match attempt {
                Ok(cancel) => break cancel,
                Err(TxFailure::Before(e)) if retry.again(&e, "cancelling a task").await => {}
                Err(TxFailure::Before(e)) => return Err(db(e)),
                Err(TxFailure::AtCommit(e)) => {
                    return Err(EngineError::backend(
                        format!(
                            "postgres: the connection failed while committing the cancel of task {task_uuid}, so \
                             whether it was cancelled is unknown (task_status tells; cancelling again is safe)"
                        ),
                        e,
                    ))
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
        let mut retry = ClientRetry::new();
        let nothing_left = loop {
            let attempt =
                within(WRITE_TIMEOUT, "retrying", self.retry_transaction(task_uuid)).await;
            match attempt {
                Ok(nothing_left) => break nothing_left,
                Err(RetryFailure::Tx(TxFailure::Before(e)))
                    if retry.again(&e, "retrying a task").await => {}
                Err(RetryFailure::Tx(TxFailure::Before(e))) => return Err(db(e)),
                Err(RetryFailure::Tx(TxFailure::AtCommit(e))) => {
                    return Err(EngineError::backend(
                        format!(
                            "postgres: the connection failed while committing the retry of task {task_uuid}, so \
                             whether it runs again is unknown (task_status tells; a retry of a task that runs is refused)"
                        ),
                        e,
                    ))
                }
                Err(RetryFailure::Engine(e)) => return Err(e),
            }
        };
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
            let fresh = within(
                WRITE_TIMEOUT,
                "claiming",
                claim_rows(&pool, &self.scope, room),
            )
            .await;
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

/// The pool's and the listener's connection options: the URL's, plus the session settings and
/// an `application_name` naming the worker (visible in `pg_stat_activity`).
fn connect_options(url: &str, worker_id: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let mut options = PgConnectOptions::from_str(url)?.options(SESSION_SETTINGS.iter().copied());
    if options.get_application_name().is_none() {
        options = options.application_name(&format!("tasker {worker_id}"));
    }
    Ok(options)
}

/// `work`, or past `limit` an I/O error "`what` took longer than N s" (the kind a retry may cure):
/// a connection that died silently must not hold anything up.
pub(super) async fn within<T, E: From<sqlx::Error>>(
    limit: Duration,
    what: &str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(E::from(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} took longer than {}s", limit.as_secs()),
        ))))
    })
}

fn db(e: sqlx::Error) -> EngineError {
    EngineError::backend("postgres", e)
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
}
