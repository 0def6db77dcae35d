//! The write task: the transaction that records a batch of outcomes (results, retries,
//! successors, task endings), then claims, isolating what the database cannot store.

use super::client::{is_transient, sqlstate};
use super::listen::STEPS_READY;
use super::statements::{claim_rows, halt_tasks, notify_finished, notify_halted, settle_tasks};
use super::{ms, within, ClaimScope};
use crate::attempt::InFlight;
use crate::template::TaskTemplate;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, error, warn};
use uuid::Uuid;

/// Longest a record transaction may take before it is abandoned (rolled back) and retried:
/// a connection that died silently must not hold the outcomes forever.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// One attempt's outcome, decided on the engine thread and ready to be written.
#[derive(Clone)]
pub(super) struct Entry {
    pub(super) flight: InFlight,
    /// The task's template (successors of a completed step); `None` when `effect` needs none.
    pub(super) template: Option<Arc<TaskTemplate>>,
    pub(super) effect: Effect,
    /// The completion's metadata, stored with the step (`None`: no completion reported any,
    /// as when the attempt timed out).
    pub(super) metadata: Option<Value>,
}

#[derive(Clone)]
pub(super) enum Effect {
    Complete(Value),
    Retry { delay_ms: i64, message: String },
    Fail(String),
}

/// What one write task did, handed back to the engine thread.
#[derive(Default)]
pub(super) struct WriteDone {
    /// Attempts (step, attempt) whose outcomes are settled (written, or found stale).
    pub(super) recorded: Vec<(Uuid, u32)>,
    /// Tasks that stopped starting steps because a step failed for good.
    pub(super) halted: Vec<Uuid>,
    /// Outcomes not written (the database is unreachable, rows are locked): written later.
    pub(super) kept: Vec<Entry>,
    /// Why something was kept, for the log.
    pub(super) kept_because: Option<String>,
    /// How many of `kept` wait for rows another session holds.
    pub(super) deferred: usize,
    pub(super) finished: Vec<Uuid>,
    pub(super) readiness: Readiness,
    /// Claim room reserved for the transaction (counted in `outstanding` while it ran).
    pub(super) reserved: usize,
    /// The claim in the transaction ran, and committed.
    pub(super) claim_ran: bool,
    /// The transaction failed: whatever it would have claimed is still there.
    pub(super) claim_lost: bool,
    pub(super) claimed: Vec<PgRow>,
}

/// PostgreSQL text cannot hold NUL: written as the six characters `\u0000` instead.
pub(super) fn storable_text(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\\u0000")
    } else {
        text
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Locking {
    /// Wait for row locks (up to `lock_timeout`).
    Wait,
    /// Write only the outcomes of tasks whose rows no other session holds; defer the rest.
    SkipLocked,
}

/// What one transaction did.
#[derive(Default)]
pub(super) struct Written {
    /// Indices (into the entries) deferred because another session holds their task's row.
    pub(super) deferred: Vec<usize>,
    pub(super) finished: Vec<Uuid>,
    pub(super) halted: Vec<Uuid>,
    pub(super) readiness: Readiness,
    pub(super) claim_ran: bool,
    pub(super) claimed: Vec<PgRow>,
}

/// The claim a record transaction makes after its writes.
#[derive(Clone, Copy)]
pub(super) struct Claim {
    pub(super) room: usize,
    /// Claim even when the outcomes made no successor ready (something else may be ready).
    pub(super) even_if_nothing_readied: bool,
}

impl Claim {
    pub(super) const NONE: Claim = Claim {
        room: 0,
        even_if_nothing_readied: false,
    };
}

/// The write task: record `entries` (and claim as `claim` says), isolating what cannot be stored.
pub(super) async fn write_outcomes(
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
pub(super) async fn isolate(
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
    pub(super) fn absorb(&mut self, written: Written, entries: &[Entry], subset: &[usize]) {
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

    pub(super) fn keep(&mut self, entries: &[Entry], subset: &[usize], e: &sqlx::Error) {
        self.kept.extend(subset.iter().map(|&i| entries[i].clone()));
        self.kept_because = Some(e.to_string());
    }
}

/// One transaction: the outcomes of `subset`, then a claim. Deadlocks and serialization
/// failures are retried at once, a few times.
pub(super) async fn write_transaction(
    pool: &PgPool,
    scope: &ClaimScope,
    entries: &[Entry],
    subset: &[usize],
    claim: Claim,
    locking: Locking,
) -> Result<Written, sqlx::Error> {
    let mut tries = 0;
    loop {
        let attempt = within(
            WRITE_TIMEOUT,
            "the transaction",
            write_once(pool, scope, entries, subset, claim, locking),
        )
        .await;
        match attempt {
            Err(e) if tries < 3 && sqlstate(&e).is_some_and(|c| c == "40P01" || c == "40001") => {
                tries += 1;
            }
            other => return other,
        }
    }
}

pub(super) async fn write_once(
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
    let (finished, halted, readiness) =
        write_entries(&mut tx, scope, entries, &writing, &endings).await?;
    let claims = claim.room > 0 && (claim.even_if_nothing_readied || readiness.readied);
    let claimed = if claims {
        claim_rows(&mut *tx, scope, claim.room).await?
    } else {
        Vec::new()
    };
    // Other workers need a NOTIFY only for what this one did not take: a retry falling due
    // later, or ready steps beyond its room. One per batch (NOTIFY takes a global lock at commit).
    let left_over = readiness.readied
        && (!claims || claimed.len() == claim.room || readiness.foreign_successors);
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
pub(super) async fn write_entries(
    tx: &mut Transaction<'static, Postgres>,
    scope: &ClaimScope,
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

    let mut readiness = Readiness::default();
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
                        edges.namespace.push(template.steps[next].namespace.clone());
                        // A successor of another namespace is for other workers: they need the
                        // NOTIFY even when this one has room to claim.
                        readiness.foreign_successors |=
                            !scope.namespaces.contains(&template.steps[next].namespace);
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
pub(super) struct Edges {
    pub(super) src: Vec<Uuid>,
    /// The attempt of the completion the edge comes from: only the step's current attempt counts.
    pub(super) src_attempt: Vec<i32>,
    pub(super) task: Vec<Uuid>,
    pub(super) index: Vec<i32>,
    pub(super) timeout: Vec<i32>,
    pub(super) namespace: Vec<String>,
}

/// Record successful attempts ($1 steps, $2 attempts, $3 results, $10 metadata) and their effects: each edge
/// ($4 completed step, $9 its attempt → $5 task, $6 successor index, $7 its timeout, $8
/// namespace) of a current completion counts toward that successor, once. Returns ("done",
/// step) per current completion, ("ready", step) per successor made ready, ("finished", task)
/// per task now complete.
pub(super) const COMPLETE_SQL: &str = "WITH input AS (
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

/// What a batch of outcomes made claimable.
#[derive(Default)]
pub(super) struct Readiness {
    /// Successors became ready now.
    pub(super) readied: bool,
    /// Some successors counted toward belong to namespaces this worker does not run (a
    /// polyglot workflow): if any became ready, only a NOTIFY tells their workers at once.
    pub(super) foreign_successors: bool,
    /// Steps will be ready again after their backoff.
    pub(super) retried: bool,
}
