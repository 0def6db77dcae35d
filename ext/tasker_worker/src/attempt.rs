//! One dispatched attempt of a step, as the engine, the hand-off and the backends share it: its
//! in-flight record (the phase that the engine and the handler threads move on without a lock)
//! and how it ended.

use crate::events::{unix_ns, StepExecutionCompletionEvent};
use crate::metrics::StepMetrics;
use crate::template::{OnTimeout, StepDefinition};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Where a dispatched attempt is. Shared by every copy of its [`InFlight`], so that the engine,
/// the handler thread taking it and the thread completing it agree without a lock: each
/// transition is one compare-and-swap, and exactly one side wins it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// In the dispatch channel, not yet taken by a handler thread.
    Queued = 0,
    /// A handler thread took it: its handler runs.
    Running = 1,
    /// Its deadline passed while the handler ran: the attempt is over (recorded as timed out when
    /// the handler returns), and the next attempt waits for that return.
    TimedOut = 2,
    /// Its task was cancelled while the handler ran: recorded when the handler returns.
    Cancelled = 3,
    /// Completed, or handed back unrun: nothing more may happen to it.
    Done = 4,
}

#[derive(Debug, Default)]
pub struct AttemptPhase {
    phase: AtomicU8,
    /// When a handler thread began running it (Unix ns, for the step duration metric); 0 before.
    started_unix_ns: AtomicU64,
    /// How long after its claim a handler thread took it, plus one ns (so that 0 means "not yet"):
    /// a running attempt's timeout counts from here, not from its claim.
    started_after_claim_ns: AtomicU64,
}

impl AttemptPhase {
    fn decode(value: u8) -> Phase {
        match value {
            0 => Phase::Queued,
            1 => Phase::Running,
            2 => Phase::TimedOut,
            3 => Phase::Cancelled,
            _ => Phase::Done,
        }
    }

    pub fn get(&self) -> Phase {
        Self::decode(self.phase.load(Ordering::Acquire))
    }

    /// A handler thread is taking the attempt, `after` its claim. Stored before the move to
    /// `Running`, so that whoever sees `Running` also sees the deadline that comes with it; only
    /// the first take is stored (a later call must not move a running attempt's deadline).
    fn mark_taken(&self, after: Duration) {
        let ns = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX - 1);
        let _ = self.started_after_claim_ns.compare_exchange(
            0,
            ns.saturating_add(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    fn taken_after_claim(&self) -> Option<Duration> {
        match self.started_after_claim_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(Duration::from_nanos(ns - 1)),
        }
    }

    /// How long the handler has run, if it started.
    pub fn running_for(&self) -> Option<Duration> {
        match self.started_unix_ns.load(Ordering::Relaxed) {
            0 => None,
            started => Some(Duration::from_nanos(unix_ns().saturating_sub(started))),
        }
    }

    /// Move to `Done` from wherever it is; the phase it was in, or `None` if already done.
    pub fn finish(&self) -> Option<Phase> {
        let previous = Self::decode(self.phase.swap(Phase::Done as u8, Ordering::AcqRel));
        (previous != Phase::Done).then_some(previous)
    }

    /// Move from `from` to `to`; false if the attempt was not in `from`.
    pub fn advance(&self, from: Phase, to: Phase) -> bool {
        self.phase
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// What the engine remembers about a dispatched attempt until its completion or timeout.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub task_uuid: Uuid,
    pub step_uuid: Uuid,
    /// Position of the step in its template (the memory backend's address for it).
    pub step_index: usize,
    pub step_name: Arc<str>,
    pub attempt: u32,
    /// When it was claimed: a queued attempt's timeout counts from here (see [`Self::deadline`]).
    pub claimed_at: Instant,
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
    pub phase: Arc<AttemptPhase>,
    /// The step's metric series (set by the engine when it dispatches the attempt).
    pub metrics: Option<Arc<StepMetrics>>,
    /// When the step became ready (see [`crate::events::StepExecutionEvent::ready_at_ns`]).
    pub ready_at_ns: u64,
}

impl InFlight {
    /// A new attempt of `definition`, claimed `now`, not yet taken by a handler thread.
    pub fn new(
        task_uuid: Uuid,
        step_uuid: Uuid,
        step_index: usize,
        definition: &StepDefinition,
        attempt: u32,
        now: Instant,
    ) -> Self {
        Self {
            task_uuid,
            step_uuid,
            step_index,
            step_name: Arc::clone(&definition.name),
            attempt,
            claimed_at: now,
            timeout: definition.timeout,
            on_timeout: definition.on_timeout,
            phase: Arc::new(AttemptPhase::default()),
            metrics: None,
            ready_at_ns: 0,
        }
    }

    /// An attempt of a step its template does not have (a stored template changed under the same
    /// version): it is failed at once, never run.
    pub fn unknown_step(
        task_uuid: Uuid,
        step_uuid: Uuid,
        step_index: usize,
        attempt: u32,
        now: Instant,
    ) -> Self {
        Self {
            task_uuid,
            step_uuid,
            step_index,
            step_name: Arc::from(format!("#{step_index}")),
            attempt,
            claimed_at: now,
            timeout: Duration::ZERO,
            on_timeout: OnTimeout::Raise,
            phase: Arc::new(AttemptPhase::default()),
            metrics: None,
            ready_at_ns: 0,
        }
    }

    /// When the attempt is over if it has not completed. Running: its timeout after a handler
    /// thread took it. Still queued: its timeout after its claim; the engine then hands it back
    /// unrun (the attempt does not count), so a worker may claim ahead of its handler threads
    /// without the steps waiting behind slow handlers using up their attempts.
    pub fn deadline(&self) -> Instant {
        // A timeout is at most a day (template validation), the wait for a thread far less than
        // a century: no overflow.
        self.claimed_at + self.phase.taken_after_claim().unwrap_or_default() + self.timeout
    }

    /// A handler thread takes the attempt now. False if it must not run (it was handed back,
    /// withdrawn, or already taken).
    pub fn begin_running(&self) -> bool {
        self.phase.mark_taken(self.claimed_at.elapsed());
        let began = self.phase.advance(Phase::Queued, Phase::Running);
        if began {
            self.phase
                .started_unix_ns
                .store(unix_ns(), Ordering::Relaxed);
        }
        began
    }

    /// The message an attempt that outlived its timeout is recorded with.
    pub fn timeout_message(&self) -> String {
        format!(
            "TaskerCore::StepTimeoutError: attempt {} of step {} timed out after {}s",
            self.attempt,
            self.step_name,
            fmt_secs(self.timeout)
        )
    }
}

/// Seconds without a trailing `.000` for whole numbers.
pub fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", s as u64)
    } else {
        format!("{s:.3}")
    }
}

/// Why an attempt ended.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    Completed(Box<StepExecutionCompletionEvent>),
    /// Past its timeout: never taken, or its handler has now returned (its result discarded).
    TimedOut,
    /// Its task was cancelled while it was out; what the handler reported, if it ran.
    Cancelled(Option<Box<StepExecutionCompletionEvent>>),
}

/// The longest delay a completion's `retry_after` may ask for: one year. Longer ones are cut to
/// it, so that no `Instant + Duration` in either backend can overflow, whatever a handler returns.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::TaskTemplate;

    fn step_with_timeout(seconds: f64) -> Arc<StepDefinition> {
        let yaml = format!(
            "namespace: t\nname: t\nversion: 1.0.0\nsteps:\n  - {{ name: a, handler: {{ callable: H }}, timeout_seconds: {seconds} }}\n"
        );
        let template =
            TaskTemplate::from_yaml(&yaml, std::path::Path::new("t.yml")).expect("template");
        Arc::clone(&template.steps[0])
    }

    #[test]
    fn a_queued_attempt_times_out_from_its_claim_a_running_one_from_its_start() {
        let definition = step_with_timeout(1.0);
        let claimed = Instant::now() - Duration::from_secs(10);
        let flight = InFlight::new(Uuid::nil(), Uuid::nil(), 0, &definition, 1, claimed);
        // Queued for ten seconds: a second past its claim, long gone.
        assert_eq!(flight.deadline(), claimed + Duration::from_secs(1));
        assert!(flight.begin_running());
        let deadline = flight.deadline();
        assert!(deadline > Instant::now() + Duration::from_millis(900));
        assert!(deadline <= Instant::now() + Duration::from_secs(1));
        // Taken once only.
        assert!(!flight.begin_running());
        assert_eq!(flight.deadline(), deadline);
    }

    #[test]
    fn an_attempt_handed_back_never_begins() {
        let definition = step_with_timeout(1.0);
        let flight = InFlight::new(Uuid::nil(), Uuid::nil(), 0, &definition, 1, Instant::now());
        assert!(flight.phase.advance(Phase::Queued, Phase::Done));
        assert!(!flight.begin_running());
        assert_eq!(flight.phase.get(), Phase::Done);
    }
}
