//! Prometheus metrics of one worker: counters and histograms updated where steps start and end,
//! gauges filled in at scrape time (see `web::routes`). Encoded with `prometheus-client` in the
//! OpenMetrics text format, which Prometheus scrapes natively.
//!
//! Step metrics carry `namespace`, `template` and `step` labels. Their handles are cached per
//! step definition (the engine looks them up once per claimed attempt, not once per update), so
//! the hot path costs a few atomic increments and one histogram lock per attempt.

use crate::events::StepExecutionEvent;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub namespace: String,
    pub template: String,
    pub step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub namespace: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// A step's identity: namespace, template name, step name.
type StepKey = (Arc<str>, Arc<str>, Arc<str>);

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Step durations: 1 ms to ~9 min, doubling.
fn step_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// Hand-offs and database round trips: 10 µs to ~9 s, in steps of 2.5×.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.5, 16))
}

/// The handles of one step's series, shared by all its attempts.
#[derive(Debug)]
pub struct StepMetrics {
    started: Counter,
    succeeded: Counter,
    failed: Counter,
    retried: Counter,
    timed_out: Counter,
    duration: Histogram,
    dispatch_latency: Histogram,
}

impl StepMetrics {
    /// A handler thread began running attempt `attempt`, `latency` after the step became ready.
    pub fn started(&self, attempt: u32, latency: Duration) {
        self.started.inc();
        if attempt > 1 {
            self.retried.inc();
        }
        self.dispatch_latency.observe(latency.as_secs_f64());
    }

    /// An attempt ended: `ran_for` is how long its handler ran (`None` if it never started).
    pub fn ended(&self, succeeded: bool, timed_out: bool, ran_for: Option<Duration>) {
        if succeeded {
            self.succeeded.inc();
        } else {
            self.failed.inc();
        }
        if timed_out {
            self.timed_out.inc();
        }
        if let Some(d) = ran_for {
            self.duration.observe(d.as_secs_f64());
        }
    }
}

/// Gauges whose values are read when scraped (from atomics, the backend or the database).
pub struct ScrapeGauges {
    pub steps_in_flight: Gauge,
    pub steps_queued_for_handlers: Gauge,
    pub steps_ready: Family<NamespaceLabels, Gauge>,
    pub steps_waiting_for_retry: Family<NamespaceLabels, Gauge>,
    pub steps_claimed: Family<NamespaceLabels, Gauge>,
    pub tasks: Family<TaskLabels, Gauge>,
    pub handler_threads: Family<StateLabels, Gauge>,
    pub database_pool_connections: Family<StateLabels, Gauge>,
    pub uptime_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub up: Gauge,
}

pub struct Metrics {
    registry: Registry,
    steps_started: Family<StepLabels, Counter>,
    steps_succeeded: Family<StepLabels, Counter>,
    steps_failed: Family<StepLabels, Counter>,
    steps_retried: Family<StepLabels, Counter>,
    steps_timed_out: Family<StepLabels, Counter>,
    step_duration: HistogramFamily<StepLabels>,
    dispatch_latency: HistogramFamily<StepLabels>,
    claim_duration: Histogram,
    commit_duration: Histogram,
    pub gauges: ScrapeGauges,
    by_step: Mutex<HashMap<StepKey, Arc<StepMetrics>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tasker");
        let steps_started = Family::<StepLabels, Counter>::default();
        let steps_succeeded = Family::<StepLabels, Counter>::default();
        let steps_failed = Family::<StepLabels, Counter>::default();
        let steps_retried = Family::<StepLabels, Counter>::default();
        let steps_timed_out = Family::<StepLabels, Counter>::default();
        let step_duration: HistogramFamily<StepLabels> =
            Family::new_with_constructor(step_duration_histogram);
        let dispatch_latency: HistogramFamily<StepLabels> =
            Family::new_with_constructor(latency_histogram);
        let claim_duration = latency_histogram();
        let commit_duration = latency_histogram();
        registry.register(
            "steps_started",
            "Step attempts a handler thread began running",
            steps_started.clone(),
        );
        registry.register(
            "steps_succeeded",
            "Step attempts that succeeded",
            steps_succeeded.clone(),
        );
        registry.register(
            "steps_failed",
            "Step attempts that failed (the handler raised or reported failure, or the attempt timed out)",
            steps_failed.clone(),
        );
        registry.register(
            "steps_retried",
            "Step attempts started after an earlier attempt of the same step failed (attempt > 1)",
            steps_retried.clone(),
        );
        registry.register(
            "steps_timed_out",
            "Step attempts that passed timeout_seconds (also counted as failed)",
            steps_timed_out.clone(),
        );
        registry.register_with_unit(
            "step_duration",
            "How long handlers ran, from the handler thread taking the attempt to its completion",
            Unit::Seconds,
            step_duration.clone(),
        );
        registry.register_with_unit(
            "step_dispatch_latency",
            "From a step becoming ready to a handler thread starting it",
            Unit::Seconds,
            dispatch_latency.clone(),
        );
        registry.register_with_unit(
            "backend_claim_duration",
            "How long one claim of ready steps from the backend took (a query on PostgreSQL)",
            Unit::Seconds,
            claim_duration.clone(),
        );
        registry.register_with_unit(
            "backend_commit_duration",
            "How long one transaction recording step outcomes took (PostgreSQL)",
            Unit::Seconds,
            commit_duration.clone(),
        );

        let gauges = ScrapeGauges {
            steps_in_flight: Gauge::default(),
            steps_queued_for_handlers: Gauge::default(),
            steps_ready: Family::default(),
            steps_waiting_for_retry: Family::default(),
            steps_claimed: Family::default(),
            tasks: Family::default(),
            handler_threads: Family::default(),
            database_pool_connections: Family::default(),
            uptime_seconds: Gauge::default(),
            up: Gauge::default(),
        };
        registry.register(
            "steps_in_flight",
            "Step attempts this worker has claimed and not yet recorded (queued for or running in a handler)",
            gauges.steps_in_flight.clone(),
        );
        registry.register(
            "steps_queued_for_handlers",
            "Step attempts this worker has claimed that no handler thread has taken yet",
            gauges.steps_queued_for_handlers.clone(),
        );
        registry.register(
            "steps_ready",
            "Steps ready to run and not claimed by any worker (the queue depth; whole system on PostgreSQL)",
            gauges.steps_ready.clone(),
        );
        registry.register(
            "steps_waiting_for_retry",
            "Steps whose last attempt failed, waiting for their backoff to pass",
            gauges.steps_waiting_for_retry.clone(),
        );
        registry.register(
            "steps_claimed",
            "Steps claimed by a worker and not yet recorded (whole system on PostgreSQL)",
            gauges.steps_claimed.clone(),
        );
        registry.register(
            "tasks",
            "Tasks by namespace and status (whole system on PostgreSQL; tasks this worker still holds on memory)",
            gauges.tasks.clone(),
        );
        registry.register(
            "handler_threads",
            "Handler threads running a handler (busy) or waiting for a step (idle)",
            gauges.handler_threads.clone(),
        );
        registry.register(
            "database_pool_connections",
            "The worker's PostgreSQL connections: open, and idle among them",
            gauges.database_pool_connections.clone(),
        );
        registry.register_with_unit(
            "worker_uptime",
            "Time since the worker started",
            Unit::Seconds,
            gauges.uptime_seconds.clone(),
        );
        registry.register(
            "worker_running",
            "1 while the worker runs and takes new steps, 0 while it drains or has stopped",
            gauges.up.clone(),
        );

        Self {
            registry,
            steps_started,
            steps_succeeded,
            steps_failed,
            steps_retried,
            steps_timed_out,
            step_duration,
            dispatch_latency,
            claim_duration,
            commit_duration,
            gauges,
            by_step: Mutex::new(HashMap::new()),
        }
    }

    /// The series of the step `event` runs (created on first use).
    pub fn step(&self, event: &StepExecutionEvent) -> Arc<StepMetrics> {
        let key = (
            Arc::clone(&event.task.namespace),
            Arc::clone(&event.task.name),
            Arc::clone(&event.definition.name),
        );
        let mut cache = self.by_step.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = cache.get(&key) {
            return Arc::clone(found);
        }
        let labels = StepLabels {
            namespace: key.0.to_string(),
            template: key.1.to_string(),
            step: key.2.to_string(),
        };
        let metrics = Arc::new(StepMetrics {
            started: self.steps_started.get_or_create_owned(&labels),
            succeeded: self.steps_succeeded.get_or_create_owned(&labels),
            failed: self.steps_failed.get_or_create_owned(&labels),
            retried: self.steps_retried.get_or_create_owned(&labels),
            timed_out: self.steps_timed_out.get_or_create_owned(&labels),
            duration: self.step_duration.get_or_create_owned(&labels),
            dispatch_latency: self.dispatch_latency.get_or_create_owned(&labels),
        });
        cache.insert(key, Arc::clone(&metrics));
        metrics
    }

    pub fn observe_claim(&self, took: Duration) {
        self.claim_duration.observe(took.as_secs_f64());
    }

    pub fn observe_commit(&self, took: Duration) {
        self.commit_duration.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new();
        metrics
            .gauges
            .steps_ready
            .get_or_create(&NamespaceLabels {
                namespace: "n".into(),
            })
            .set(0);
        let text = metrics.encode();
        for needle in [
            "# TYPE tasker_steps_in_flight gauge",
            "# UNIT tasker_backend_claim_duration_seconds seconds",
            "# TYPE tasker_backend_claim_duration_seconds histogram",
            "tasker_steps_ready{namespace=\"n\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
