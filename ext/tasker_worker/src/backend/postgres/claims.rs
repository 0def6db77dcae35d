//! Claiming ready steps, building their events, and the claims' leases (renewal, release).

use super::listen::STEPS_READY;
use super::statements::{lock_tasks, notify_finished, settle_tasks};
use super::write::{Effect, Entry, WRITE_TIMEOUT};
use super::{db, within, Owned, PostgresBackend, RETRY_WRITE_AFTER};
use crate::attempt::{AttemptOutcome, InFlight};
use crate::backend::{Notification, NotificationSender};
use crate::error::EngineResult;
use crate::events::{StepExecutionEvent, TaskInfo};
use crate::template::TemplateKey;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};
use uuid::Uuid;

impl PostgresBackend {
    /// EventDriven: nothing polls, so wake up when the earliest hidden row becomes visible.
    pub(super) async fn schedule_wake(&mut self, pool: &PgPool, now: Instant) {
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
    pub(super) async fn build_events(
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
    pub(super) async fn release_attempts(
        &mut self,
        tasks: Vec<Uuid>,
        steps: Vec<Uuid>,
        attempts: Vec<i32>,
    ) {
        let Ok(pool) = self.pool().cloned() else {
            return;
        };
        let released = within(
            WRITE_TIMEOUT,
            "releasing",
            release_transaction(&pool, tasks, &steps, &attempts),
        )
        .await;
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
    /// our own enqueue, a poll or wake-up falling due), and no more than [`ClaimAhead`] allows.
    pub(super) fn claim_room(&mut self, now: Instant) -> usize {
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
        self.claim_ahead.limit(now).saturating_sub(self.outstanding)
    }

    /// After a claim of `room` that took `got`: whether anything visible may be left.
    pub(super) async fn claimed(&mut self, pool: &PgPool, room: usize, got: usize, now: Instant) {
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
    pub(super) fn claim_failed(&mut self, now: Instant) {
        self.maybe_ready = true;
        let at = now + RETRY_WRITE_AFTER;
        self.wake_claim_at = Some(self.wake_claim_at.map_or(at, |w| w.min(at)));
    }

    /// Every third of the lease, extend the lease of every attempt this process holds (queued
    /// for Ruby, running, timed out or cancelled with its handler still running, claimed ahead,
    /// or waiting for its outcome to be written), in one UPDATE on a task of its own. The same
    /// statement tells which of those attempts' tasks were cancelled: a cancel reaches this
    /// process within one renewal even without LISTEN (Polling).
    pub(super) fn renew_leases(&mut self, now: Instant) {
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
}

/// How much work a worker claims ahead of its handler threads: steps to last about this long at
/// the rate it has recently finished them.
const CLAIM_AHEAD: Duration = Duration::from_millis(50);
/// How often that rate is measured.
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// How many claimed attempts a worker holds at most (running, or queued for a thread), from how
/// fast it finishes them. Fast steps: many, so that each transaction carries many claims and
/// completions (a commit is what each one waits for). Slow steps: little more than one per thread,
/// so that the rest stay claimable by workers with free threads.
pub(super) struct ClaimAhead {
    /// Never fewer (twice the handler threads: each finds its next step waiting).
    fewest: usize,
    /// Never more (what the dispatch channel holds, plus one running per thread).
    most: usize,
    window_began: Instant,
    finished_in_window: usize,
    per_sec: f64,
}

impl ClaimAhead {
    pub(super) fn new(fewest: usize, most: usize, now: Instant) -> Self {
        Self {
            fewest,
            most: most.max(fewest),
            window_began: now,
            finished_in_window: 0,
            per_sec: 0.0,
        }
    }

    /// `count` attempts ended here (recorded, whatever their outcome).
    pub(super) fn finished(&mut self, count: usize, now: Instant) {
        self.finished_in_window += count;
        let elapsed = now.saturating_duration_since(self.window_began);
        if elapsed >= RATE_WINDOW {
            self.per_sec = self.finished_in_window as f64 / elapsed.as_secs_f64();
            self.finished_in_window = 0;
            self.window_began = now;
        }
    }

    /// How many may be held `now`. A window running late (steps stopped finishing, or slowed
    /// down) already lowers the rate: what it has seen so far over how long it has run.
    pub(super) fn limit(&self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.window_began);
        let per_sec = if elapsed > RATE_WINDOW {
            self.per_sec
                .min(self.finished_in_window as f64 / elapsed.as_secs_f64())
        } else {
            self.per_sec
        };
        // Saturating float-to-int cast: a huge rate is `most`.
        let ahead = (per_sec * CLAIM_AHEAD.as_secs_f64()) as usize;
        ahead.clamp(self.fewest, self.most)
    }
}

/// How often the leases of the attempts out here are renewed: three renewals per lease, so that
/// two may fail (the database restarting) before another process may take a step over.
pub(super) fn renewal_every(lease: Duration) -> Duration {
    lease / 3
}

/// Hand back claimed attempts that never ran (see `PostgresBackend::release_attempts`).
/// Returns the tasks that finished.
pub(super) async fn release_transaction(
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

/// Extend the lease of the attempts (`steps`, `attempts`) still current; tell the engine which
/// of their tasks were cancelled. Rows another session holds are skipped (it is recording them).
pub(super) async fn renew_leases(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_ahead_by_how_fast_steps_finish() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut ahead = ClaimAhead::new(8, 132, start);
        // Nothing measured yet: one step waiting per thread.
        assert_eq!(ahead.limit(at(0)), 8);
        // 1,000 steps in 100 ms (10,000/s): 50 ms of them is 500, capped at the channel's room.
        ahead.finished(1_000, at(100));
        assert_eq!(ahead.limit(at(100)), 132);
        // 40 steps in the next 100 ms (400/s): 20 steps ahead.
        ahead.finished(40, at(200));
        assert_eq!(ahead.limit(at(200)), 20);
        // Slow steps (4 in a second): back to the floor.
        ahead.finished(4, at(1_200));
        assert_eq!(ahead.limit(at(1_200)), 8);
    }

    #[test]
    fn measures_a_window_only_once_it_is_long_enough() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut ahead = ClaimAhead::new(8, 132, start);
        ahead.finished(500, at(10));
        assert_eq!(ahead.limit(at(10)), 8, "10 ms is too short to judge a rate");
        ahead.finished(500, at(100));
        assert_eq!(ahead.limit(at(100)), 132);
    }

    #[test]
    fn a_window_running_late_lowers_the_rate_before_it_closes() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut ahead = ClaimAhead::new(8, 132, start);
        ahead.finished(1_000, at(100));
        assert_eq!(
            ahead.limit(at(150)),
            132,
            "within the window: the last rate holds"
        );
        // Steps turned slow: nothing finished for 400 ms, so nothing more is claimed ahead.
        assert_eq!(ahead.limit(at(500)), 8);
        ahead.finished(10, at(500));
        assert_eq!(ahead.limit(at(500)), 8);
    }
}
