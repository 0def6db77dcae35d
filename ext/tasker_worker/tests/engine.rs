//! The engine end to end, with Rust threads standing in for Ruby handler threads.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tasker_worker::{
    CompletionVerdict, InterruptReason, InterruptTake, Reply, StepExecutionCompletionEvent,
    StepExecutionEvent, Take, TaskSnapshot, WorkerBootstrap, WorkerConfig, WorkerState,
    WorkerSystemHandle,
};
use uuid::Uuid;

type Outcome = Result<Value, (bool, String)>;

struct Harness {
    system: Arc<WorkerSystemHandle>,
    threads: Vec<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

fn start(
    yaml: &str,
    config: Value,
    workers: usize,
    handler: impl Fn(&StepExecutionEvent) -> Outcome + Send + Sync + 'static,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.yml"), yaml).unwrap();
    let mut map = config.as_object().cloned().unwrap_or_default();
    map.insert("templates".into(), json!(dir.path().to_str().unwrap()));
    let config = WorkerConfig::from_map(&map, |_| None).unwrap();
    let system = Arc::new(WorkerBootstrap::start(config).unwrap());
    system.started().recv().unwrap().unwrap();
    let handler = Arc::new(handler);
    let threads = (0..workers)
        .map(|_| {
            let system = Arc::clone(&system);
            let handler = Arc::clone(&handler);
            std::thread::spawn(move || {
                let (_never, cancel) = crossbeam_channel::bounded::<()>(1);
                loop {
                    match system.port().take(&cancel, None) {
                        Take::Event(event) => {
                            if !system.begin_running(event.event_id) {
                                continue;
                            }
                            let outcome = handler(&event);
                            let _ = system.complete(completion(&event, outcome));
                        }
                        Take::Nothing => continue,
                        Take::Closed => break,
                    }
                }
            })
        })
        .collect();
    Harness {
        system,
        threads,
        _dir: dir,
    }
}

fn completion(event: &StepExecutionEvent, outcome: Outcome) -> StepExecutionCompletionEvent {
    let (success, result, retryable, error_message) = match outcome {
        Ok(v) => (true, v, true, None),
        Err((retryable, message)) => (false, Value::Null, retryable, Some(message)),
    };
    StepExecutionCompletionEvent {
        event_id: event.event_id,
        task_uuid: event.task_uuid(),
        step_uuid: event.step_uuid,
        success,
        result,
        metadata: json!({}),
        error_message,
        error_class: None,
        retryable,
        retry_after: None,
        completed_at: None,
    }
}

impl Harness {
    fn create(&self, name: &str, context: Value) -> Uuid {
        let reply = self
            .system
            .request_create_task("t", name, "1.0.0", context)
            .unwrap();
        reply.recv().unwrap().unwrap()[0]
    }

    fn wait(&self, task: Uuid) -> TaskSnapshot {
        let ticket = self.system.request_wait_for_task(task).unwrap();
        let (_never, cancel) = crossbeam_channel::bounded::<()>(1);
        match tasker_worker::dispatch::wait_reply(
            &ticket.answer,
            &cancel,
            Some(Duration::from_secs(20)),
        ) {
            Reply::Value(snapshot) => snapshot.unwrap(),
            other => panic!("task {task} did not finish: {other:?}"),
        }
    }

    fn stop(self) -> Arc<WorkerSystemHandle> {
        self.system.request_stop();
        let _ = self.system.stopped().recv();
        self.system.join();
        for t in self.threads {
            t.join().unwrap();
        }
        self.system
    }
}

const DIAMOND: &str = r#"
namespace: t
name: diamond
version: 1.0.0
steps:
  - { name: a, handler: { callable: H } }
  - { name: b, dependencies: [a], handler: { callable: H } }
  - { name: c, dependencies: [a], handler: { callable: H } }
  - { name: d, dependencies: [b, c], handler: { callable: H } }
"#;

/// A root answers the context's `n` + 1; any other step the sum of its dependencies' `n` + 1.
fn add_one(e: &StepExecutionEvent) -> Outcome {
    let sum: i64 = e
        .dependency_results
        .iter()
        .map(|(_, r)| r["n"].as_i64().unwrap())
        .sum();
    let base = e.task.context["n"].as_i64().unwrap_or(0);
    Ok(json!({"n": if e.dependency_results.is_empty() { base + 1 } else { sum + 1 }}))
}

#[test]
fn diamond_runs_in_dependency_order_and_passes_results() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&order);
    let h = start(DIAMOND, json!({"concurrency": 3}), 3, move |e| {
        seen.lock().unwrap().push(e.definition.name.to_string());
        add_one(e)
    });
    let task = h.create("diamond", json!({"n": 10}));
    let snapshot = h.wait(task);
    assert_eq!(snapshot.status.as_str(), "complete");
    let results: HashMap<_, _> = snapshot
        .steps
        .iter()
        .map(|s| (s.name.clone(), s.result.clone().unwrap()))
        .collect();
    assert_eq!(results["a"]["n"], 11);
    assert_eq!(results["b"]["n"], 12);
    assert_eq!(results["d"]["n"], 25);
    let order = order.lock().unwrap().clone();
    assert_eq!(order.first().map(String::as_str), Some("a"));
    assert_eq!(order.last().map(String::as_str), Some("d"));
    let system = h.stop();
    let status = system.status();
    assert_eq!(
        (
            status.steps_processed,
            status.steps_failed,
            status.steps_in_flight
        ),
        (4, 0, 0)
    );
    assert_eq!(system.state(), WorkerState::Stopped);
}

#[test]
fn a_batch_creates_one_task_per_context_in_order_and_runs_them_all() {
    let h = start(DIAMOND, json!({"concurrency": 2}), 2, add_one);
    let contexts: Vec<Value> = (0..50).map(|n| json!({ "n": n })).collect();
    let tasks = h
        .system
        .request_create_tasks("t", "diamond", "1.0.0", contexts, None)
        .unwrap()
        .recv()
        .unwrap()
        .unwrap();
    assert_eq!(tasks.len(), 50);
    for (n, task) in tasks.iter().enumerate() {
        let snapshot = h.wait(*task);
        assert_eq!(snapshot.status.as_str(), "complete");
        let d = snapshot.steps.iter().find(|s| s.name == "d").unwrap();
        // a = n+1, b = c = n+2, d = 2n+5: each task ran with its own context.
        assert_eq!(d.result.as_ref().unwrap()["n"], 2 * n as i64 + 5);
    }

    let empty = h
        .system
        .request_create_tasks("t", "diamond", "1.0.0", Vec::new(), None)
        .unwrap()
        .recv()
        .unwrap()
        .unwrap();
    assert!(empty.is_empty());
    let err = h
        .system
        .request_create_tasks("t", "diamond", "1.0.0", vec![json!({}), json!(3)], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("contexts[1]: must be a Hash"), "{err}");
    assert_eq!(h.stop().status().steps_processed, 200);
}

const FLAKY: &str = r#"
namespace: t
name: flaky
version: 1.0.0
steps:
  - name: a
    handler: { callable: H }
    retry: { max_attempts: 3, backoff: linear, backoff_base_ms: 40, max_backoff_ms: 1000 }
  - { name: b, dependencies: [a], handler: { callable: H } }
"#;

#[test]
fn failures_retry_with_backoff_then_error_and_dependents_never_run() {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&starts);
    let h = start(FLAKY, json!({}), 2, move |e| {
        seen.lock()
            .unwrap()
            .push((e.definition.name.to_string(), e.attempt, Instant::now()));
        Err((true, format!("boom {}", e.attempt)))
    });
    let snapshot = h.wait(h.create("flaky", json!({})));
    assert_eq!(snapshot.status.as_str(), "error");
    let a = &snapshot.steps[0];
    assert_eq!((a.status.as_str(), a.attempts), ("error", 3));
    assert!(
        a.error_message.as_deref().unwrap().contains("boom 3"),
        "{:?}",
        a.error_message
    );
    assert_eq!(snapshot.steps[1].status.as_str(), "skipped");
    let starts = starts.lock().unwrap().clone();
    assert_eq!(
        starts.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(starts.iter().all(|s| s.0 == "a"));
    // Linear backoff: 40 ms after the first failure, 80 ms after the second.
    assert!(starts[1].2 - starts[0].2 >= Duration::from_millis(40));
    assert!(starts[2].2 - starts[1].2 >= Duration::from_millis(80));
    let system = h.stop();
    assert_eq!(
        (
            system.status().steps_processed,
            system.status().steps_failed
        ),
        (3, 3)
    );
}

#[test]
fn non_retryable_failure_errors_at_once() {
    let h = start(FLAKY, json!({}), 1, |_| Err((false, "permanent".into())));
    let snapshot = h.wait(h.create("flaky", json!({})));
    assert_eq!(
        (
            snapshot.steps[0].attempts,
            snapshot.steps[0].error_message.as_deref()
        ),
        (1, Some("permanent"))
    );
    h.stop();
}

const SLOW: &str = r#"
namespace: t
name: slow
version: 1.0.0
steps:
  - name: a
    handler: { callable: H }
    timeout_seconds: 0.1
    retry: { max_attempts: 2, backoff: none }
"#;

#[test]
fn a_timed_out_attempt_is_retried_only_after_its_handler_returns() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&log);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.yml"), SLOW).unwrap();
    let mut map = serde_json::Map::new();
    map.insert("templates".into(), json!(dir.path().to_str().unwrap()));
    map.insert("concurrency".into(), json!(2));
    let system =
        Arc::new(WorkerBootstrap::start(WorkerConfig::from_map(&map, |_| None).unwrap()).unwrap());
    system.started().recv().unwrap().unwrap();
    // Two handler threads, so a retry dispatched too early would find a free thread at once.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let system = Arc::clone(&system);
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let (_never, cancel) = crossbeam_channel::bounded::<()>(1);
                while let Take::Event(event) =
                    system.port().take(&cancel, Some(Duration::from_secs(2)))
                {
                    assert!(system.begin_running(event.event_id));
                    let started = Instant::now();
                    std::thread::sleep(Duration::from_millis(250));
                    // The handler returns here: the engine may start the next attempt as soon
                    // as `complete` tells it, before `complete` returns to this thread.
                    let returned = Instant::now();
                    let verdict = system.complete(completion(&event, Ok(json!({}))));
                    seen.lock()
                        .unwrap()
                        .push((event.attempt, started, returned, verdict));
                }
            })
        })
        .collect();
    let task = system
        .request_create_task("t", "slow", "1.0.0", json!({}))
        .unwrap()
        .recv()
        .unwrap()
        .unwrap()[0];
    // The engine asks for the running handler to be interrupted, naming the attempt.
    let (_never, cancel) = crossbeam_channel::bounded::<()>(1);
    let InterruptTake::Interrupt(interrupt) = system
        .interrupt_port()
        .take(&cancel, Some(Duration::from_secs(5)))
    else {
        panic!("no interrupt for the timed-out attempt")
    };
    assert_eq!(
        (interrupt.task_uuid, interrupt.attempt, interrupt.reason),
        (task, 1, InterruptReason::Timeout)
    );
    let ticket = system.request_wait_for_task(task).unwrap();
    let snapshot = ticket
        .answer
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert_eq!(snapshot.status.as_str(), "error");
    assert_eq!(snapshot.steps[0].attempts, 2);
    let message = snapshot.steps[0].error_message.as_deref().unwrap();
    assert!(
        message.contains("StepTimeoutError") && message.contains("timed out after 0.100s"),
        "{message}"
    );
    for worker in workers {
        worker.join().unwrap();
    }
    let mut runs = std::mem::take(&mut *log.lock().unwrap());
    runs.sort_by_key(|r| r.1);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(
        runs[1].1 >= runs[0].2,
        "attempt 2 started before attempt 1 returned: {runs:?}"
    );
    // Late results are refused (and discarded): both attempts are recorded as timed out.
    assert!(
        runs.iter()
            .all(|r| matches!(r.3, CompletionVerdict::TimedOut(_))),
        "{runs:?}"
    );
    let status = system.status();
    assert_eq!(
        (
            status.steps_processed,
            status.steps_failed,
            status.steps_in_flight
        ),
        (2, 2, 0)
    );
    system.request_stop();
    let _ = system.stopped().recv();
    system.join();
}

const ONE: &str = r#"
namespace: t
name: one
version: 1.0.0
steps:
  - { name: a, handler: { callable: H } }
"#;

#[test]
fn graceful_shutdown_finishes_in_flight_steps_and_starts_nothing_new() {
    let runs = Arc::new(Mutex::new(HashMap::<Uuid, u32>::new()));
    let seen = Arc::clone(&runs);
    let h = start(ONE, json!({"concurrency": 2}), 2, move |e| {
        *seen.lock().unwrap().entry(e.step_uuid).or_default() += 1;
        std::thread::sleep(Duration::from_millis(20));
        Ok(json!({}))
    });
    let tasks: Vec<Uuid> = (0..100).map(|_| h.create("one", json!({}))).collect();
    std::thread::sleep(Duration::from_millis(60));
    h.system.transition_to_graceful_shutdown().unwrap();
    let system = h.stop();
    let runs = runs.lock().unwrap();
    assert!(runs.values().all(|&n| n == 1), "a step ran twice");
    let status = system.status();
    assert_eq!(
        status.steps_processed,
        runs.len() as u64,
        "every started step was recorded"
    );
    assert_eq!(status.steps_in_flight, 0);
    assert!(
        runs.len() < tasks.len(),
        "shutdown let every task run ({} of {})",
        runs.len(),
        tasks.len()
    );
}

#[test]
fn events_taken_after_a_shutdown_request_go_back_unrun() {
    // No handler threads: the test takes events itself.
    let h = start(ONE, json!({"concurrency": 2}), 0, |_| Ok(json!({})));
    let tasks: Vec<Uuid> = (0..10).map(|_| h.create("one", json!({}))).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.system.status().steps_in_flight < 4 {
        assert!(
            Instant::now() < deadline,
            "the dispatch channel never filled"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!h.system.is_draining());
    h.system.transition_to_graceful_shutdown().unwrap();
    assert!(
        h.system.is_draining(),
        "draining is visible as soon as the request returns"
    );
    // Whatever a taker still finds queued (the engine may not have recalled it yet) goes back.
    while let Take::Event(event) = h.system.port().try_take() {
        h.system.release_untaken(event.event_id);
    }
    while h.system.status().steps_in_flight > 0 {
        assert!(
            Instant::now() < deadline,
            "released attempts stayed in flight"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    for task in tasks {
        let snapshot = h
            .system
            .request_task_status(task)
            .unwrap()
            .recv()
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                snapshot.steps[0].status.as_str(),
                snapshot.steps[0].attempts
            ),
            ("enqueued", 0),
            "a released attempt does not count"
        );
    }
    let system = h.stop();
    assert_eq!(system.status().steps_processed, 0);
}

#[test]
fn unknown_templates_and_bad_context_are_configuration_errors() {
    let h = start(ONE, json!({}), 1, |_| Ok(json!({})));
    let err = h
        .system
        .request_create_task("t", "nope", "1.0.0", json!({}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown template t/nope@1.0.0") && err.contains("t/one@1.0.0"),
        "{err}"
    );
    let err = h
        .system
        .request_create_task("t", "one", "1.0.0", json!([1]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("context"), "{err}");
    h.stop();
}

#[test]
fn an_event_that_waited_its_whole_timeout_in_the_queue_goes_back_unrun() {
    // No handler threads: the step's attempt waits in the channel past its timeout (0.1 s).
    let h = start(SLOW, json!({}), 0, |_| Ok(json!({})));
    let task = h.create("slow", json!({}));
    let (_never, cancel) = crossbeam_channel::bounded::<()>(1);
    let Take::Event(stale) = h.system.port().take(&cancel, Some(Duration::from_secs(5))) else {
        panic!("no event was dispatched")
    };
    // Taken from the channel but not begun: the engine still counts it as queued.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.system.is_in_flight(stale.event_id) {
        assert!(
            Instant::now() < deadline,
            "the queued attempt was never handed back"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !h.system.begin_running(stale.event_id),
        "an attempt handed back may still begin"
    );
    // The step is handed out again as the same attempt: the one that never ran does not count.
    let Take::Event(again) = h.system.port().take(&cancel, Some(Duration::from_secs(5))) else {
        panic!("the step was not dispatched again")
    };
    assert_eq!((stale.attempt, again.attempt), (1, 1));
    assert_ne!(again.event_id, stale.event_id);
    assert!(h.system.begin_running(again.event_id));
    assert_eq!(
        h.system.complete(completion(&again, Ok(json!({})))),
        CompletionVerdict::Accepted
    );
    let done = h.wait(task);
    assert_eq!(done.status.as_str(), "complete");
    assert_eq!(h.system.status().steps_failed, 0);
    h.stop();
}

const BRANCHES: &str = r#"
namespace: t
name: branches
version: 1.0.0
steps:
  - { name: fails, handler: { callable: H }, retry: { retryable: false } }
  - { name: slow, handler: { callable: H } }
  - { name: after_slow, dependencies: [slow], handler: { callable: H } }
  - { name: after_fails, dependencies: [fails], handler: { callable: H } }
"#;

#[test]
fn a_failed_task_ends_only_when_its_running_steps_have_returned() {
    let slow_returned = Arc::new(Mutex::new(None));
    let returned = Arc::clone(&slow_returned);
    let slow_started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Arc::clone(&slow_started);
    let h = start(BRANCHES, json!({"concurrency": 2}), 2, move |e| {
        match &*e.definition.name {
            "fails" => {
                // Fail only once the other branch runs (on a loaded machine it could otherwise
                // be skipped before it starts, which is right, but not what this test is about).
                let deadline = Instant::now() + Duration::from_secs(10);
                while !started.load(std::sync::atomic::Ordering::Acquire)
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((false, "no".into()))
            }
            "slow" => {
                started.store(true, std::sync::atomic::Ordering::Release);
                std::thread::sleep(Duration::from_millis(300));
                *returned.lock().unwrap() = Some(Instant::now());
                Ok(json!({"slow": true}))
            }
            _ => Ok(json!({})),
        }
    });
    let snapshot = h.wait(h.create("branches", json!({})));
    let answered = Instant::now();
    let returned = slow_returned.lock().unwrap().expect("the slow branch ran");
    assert!(
        answered >= returned,
        "wait_for_task answered while a step ran"
    );
    assert_eq!(snapshot.status.as_str(), "error");
    let statuses: Vec<&str> = snapshot.steps.iter().map(|s| s.status.as_str()).collect();
    // The running branch finished (and kept its result); nothing new started after the failure.
    assert_eq!(statuses, vec!["error", "complete", "skipped", "skipped"]);
    assert!(snapshot.completed_at_ns.is_some());
    let slow = &snapshot.steps[1];
    assert!(slow.started_at_ns.unwrap() < slow.completed_at_ns.unwrap());
    h.stop();
}

#[test]
fn cancel_interrupts_running_steps_and_settles_the_rest_then_retry_runs_them_again() {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&runs);
    let release = Arc::new(Mutex::new(false));
    let gate = Arc::clone(&release);
    let h = start(BRANCHES, json!({"concurrency": 2}), 2, move |e| {
        seen.lock()
            .unwrap()
            .push((e.definition.name.to_string(), e.attempt));
        match &*e.definition.name {
            // Blocks until the test opens the gate (as a handler would until interrupted).
            "slow" | "fails" => {
                while !*gate.lock().unwrap() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((true, "TaskerCore::StepCancelledError: interrupted".into()))
            }
            _ => Ok(json!({})),
        }
    });
    let task = h.create("branches", json!({}));
    // Both roots are running.
    let deadline = Instant::now() + Duration::from_secs(5);
    while runs.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let cancelled = h
        .system
        .request_cancel_task(task)
        .unwrap()
        .recv()
        .unwrap()
        .unwrap();
    assert!(cancelled);
    let (_never, cancel) = crossbeam_channel::bounded::<()>(1);
    let mut reasons = Vec::new();
    while reasons.len() < 2 {
        match h
            .system
            .interrupt_port()
            .take(&cancel, Some(Duration::from_secs(5)))
        {
            InterruptTake::Interrupt(i) => reasons.push((i.task_uuid, i.reason)),
            other => panic!("expected interrupts for both running steps: {other:?}"),
        }
    }
    assert!(reasons
        .iter()
        .all(|r| *r == (task, InterruptReason::Cancelled)));
    let status = h
        .system
        .request_task_status(task)
        .unwrap()
        .recv()
        .unwrap()
        .unwrap();
    assert_eq!(status.status.as_str(), "in_progress", "handlers still run");
    *release.lock().unwrap() = true;
    let snapshot = h.wait(task);
    assert_eq!(snapshot.status.as_str(), "cancelled");
    let statuses: Vec<&str> = snapshot.steps.iter().map(|s| s.status.as_str()).collect();
    assert_eq!(statuses, vec!["cancelled"; 4]);
    // A finished task is not cancelled again.
    let again = h.system.request_cancel_task(task).unwrap().recv().unwrap();
    assert!(!again.unwrap());

    // Retry: the cancelled steps run again; attempts go on counting.
    h.system
        .request_retry_task(task)
        .unwrap()
        .recv()
        .unwrap()
        .unwrap();
    let snapshot = h.wait(task);
    assert_eq!(snapshot.status.as_str(), "error", "`fails` fails again");
    assert_eq!(snapshot.steps[0].attempts, 2);
    let err = h
        .system
        .request_retry_task(Uuid::new_v4())
        .unwrap()
        .recv()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, tasker_worker::EngineError::UnknownTask(_)));
    h.stop();
}

#[test]
fn a_running_task_cannot_be_retried() {
    let h = start(SLOW, json!({}), 1, |_| {
        std::thread::sleep(Duration::from_millis(50));
        Ok(json!({}))
    });
    let task = h.create("slow", json!({}));
    let err = h
        .system
        .request_retry_task(task)
        .unwrap()
        .recv()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("still running"), "{err}");
    h.wait(task);
    let err = h
        .system
        .request_retry_task(task)
        .unwrap()
        .recv()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("is complete"), "{err}");
    h.stop();
}
