//! Recording outcomes, on the engine thread: what each outcome does to its step (complete,
//! retry, fail), batching them for the write task, and taking its results.

use super::client::ClientRetry;
use super::snapshot::read_snapshot;
use super::write::{storable_text, write_outcomes, Claim, Effect, Entry, Locking, WriteDone};
use super::{PostgresBackend, RETRY_WRITE_AFTER};
use crate::attempt::{AttemptOutcome, InFlight, MAX_RETRY_AFTER};
use crate::backend::Notification;
use crate::template::TaskTemplate;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};
use uuid::Uuid;

/// Retries (`RETRY_WRITE_AFTER` apart) of a failed write while shutting down, before the
/// outcomes are left to the claims' expiry (their steps then run again elsewhere).
pub(super) const SHUTDOWN_WRITE_RETRIES: usize = 8;

impl PostgresBackend {
    /// Decide what each outcome does to its step (on the engine thread: templates are here).
    pub(super) async fn prepare(
        &mut self,
        outcomes: Vec<(InFlight, AttemptOutcome)>,
    ) -> Vec<Entry> {
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

    /// Start a write task for the pending outcomes, unless one runs or a retry is not due yet.
    pub(super) fn start_write(&mut self, now: Instant) {
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
            self.claim_ahead.limit(now).saturating_sub(self.outstanding)
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
    pub(super) async fn record_outcomes(
        &mut self,
        outcomes: Vec<(InFlight, AttemptOutcome)>,
        now: Instant,
    ) {
        self.outstanding = self.outstanding.saturating_sub(outcomes.len());
        self.claim_ahead.finished(outcomes.len(), now);
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
    pub(super) async fn release_halted_prefetched(&mut self) {
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

    /// Take the results of finished write tasks.
    pub(super) async fn take_write_results(&mut self, now: Instant) {
        while let Ok(done) = self.write_results.try_recv() {
            self.finish_write(done, now).await;
        }
    }

    pub(super) async fn finish_write(&mut self, done: WriteDone, now: Instant) {
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
    pub(super) async fn announce_ended(&self, finished: &[Uuid]) {
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
    pub(super) async fn wait_for_write(&mut self, now: Instant) {
        while self.writing {
            match self.write_results.recv().await {
                Some(done) => self.finish_write(done, now).await,
                None => break,
            }
        }
    }
}

/// Where in `value` a NUL character sits (jsonb cannot store one), as a path like `$.a[2]`.
pub(super) fn nul_in(value: &Value) -> Option<String> {
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

/// What an outcome does to its step: complete it, retry it after a delay, or fail it for good.
/// `base`: the step's attempts before its task was last retried (its retry budget counts from
/// there).
pub(super) fn entry_for(
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
pub(super) fn unstorable_message(part: &str, path: &str) -> String {
    format!(
        "the step's {part} cannot be stored in PostgreSQL: it contains a NUL character (\\u0000) at {path}, \
         which jsonb does not accept"
    )
}

/// A retry delay in ms: up to `MAX_RETRY_AFTER` (a year), more than an `int4` of ms holds.
pub(super) fn delay_ms(d: Duration) -> i64 {
    d.min(MAX_RETRY_AFTER).as_millis() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
