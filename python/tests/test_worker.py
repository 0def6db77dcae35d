"""Steps run in Python handler threads: results, dependencies, retries, errors, timeouts."""

from __future__ import annotations

import time

import pytest
from handlers import basic

import tasker_core
from tasker_core import Worker


@pytest.fixture
def worker(templates):
    with Worker.start({"templates": [templates], "concurrency": 2, "shutdown_timeout": 5}) as running:
        yield running


def step(status: dict, name: str) -> dict:
    (found,) = (s for s in status["steps"] if s["name"] == name)
    return found


def test_a_diamond_runs_with_dependency_results(worker):
    uuid = tasker_core.create_task("python_demo", "diamond", context={"start": 5})
    status = tasker_core.wait_for_task(uuid, timeout=10)
    assert status["status"] == "complete"
    assert step(status, "a")["result"] == {"value": 10}
    assert step(status, "b")["result"] == {"value": 20}
    assert step(status, "d")["result"] == {"value": 40}
    assert step(status, "d")["metadata"] == {"summed": ["b", "c"]}


def test_create_tasks_and_wait_for_tasks_keep_the_order(worker):
    uuids = tasker_core.create_tasks("python_demo", "diamond", [{"start": n} for n in range(1, 21)])
    statuses = tasker_core.wait_for_tasks(uuids, timeout=20)
    assert [s["task_uuid"] for s in statuses] == uuids
    assert [step(s, "d")["result"]["value"] for s in statuses] == [8 * n for n in range(1, 21)]


def test_a_failing_handler_is_retried_until_it_succeeds(worker):
    uuid = tasker_core.create_task("python_failures", "flaky", context={"succeed_on": 3})
    status = tasker_core.wait_for_task(uuid, timeout=10)
    assert status["status"] == "complete"
    assert basic.ATTEMPTS[uuid] == [1, 2, 3]
    assert step(status, "flaky")["result"] == {"attempt": 3}


def test_retries_stop_at_max_attempts_with_the_error_recorded(worker):
    uuid = tasker_core.create_task("python_failures", "flaky")
    status = tasker_core.wait_for_task(uuid, timeout=10)
    assert status["status"] == "error"
    assert basic.ATTEMPTS[uuid] == [1, 2, 3]
    assert "RuntimeError: attempt 3 failed" in step(status, "flaky")["error_message"]


def test_permanent_error_fails_the_step_at_once(worker):
    uuid = tasker_core.create_task("python_failures", "permanent")
    status = tasker_core.wait_for_task(uuid, timeout=10)
    assert status["status"] == "error"
    assert basic.ATTEMPTS[uuid] == [1]
    assert "PermanentError: no point in retrying" in step(status, "refuse")["error_message"]


def test_retryable_error_waits_its_retry_after(worker):
    started = time.monotonic()
    uuid = tasker_core.create_task("python_failures", "retry_after")
    status = tasker_core.wait_for_task(uuid, timeout=10)
    assert status["status"] == "complete"
    assert step(status, "later")["result"]["at"] - started >= 0.4


def test_a_missing_handler_class_fails_the_step_naming_it(worker):
    uuid = tasker_core.create_task("python_failures", "missing")
    status = tasker_core.wait_for_task(uuid, timeout=10)
    assert status["status"] == "error"
    message = step(status, "nowhere")["error_message"]
    assert "handlers.basic.DoesNotExist" in message and "DoesNotExist is not found" in message


def test_a_result_that_is_not_json_fails_the_step_and_the_worker_goes_on(worker):
    uuid = tasker_core.create_task("python_failures", "unjsonable")
    status = tasker_core.wait_for_task(uuid, timeout=10)
    assert status["status"] == "error"
    assert "not JSON-able" in step(status, "bad")["error_message"]
    ok = tasker_core.create_task("python_demo", "diamond")
    assert tasker_core.wait_for_task(ok, timeout=10)["status"] == "complete"


def test_a_handler_past_its_timeout_is_interrupted_and_the_attempt_retried(worker):
    uuid = tasker_core.create_task("python_failures", "slow", context={"seconds": 5})
    started = time.monotonic()
    status = tasker_core.wait_for_task(uuid, timeout=10)
    assert status["status"] == "error"
    assert basic.ATTEMPTS[uuid] == [1, 2]
    assert basic.ATTEMPTS[uuid + ":interrupted"] == ["StepTimeoutError", "StepTimeoutError"]
    assert time.monotonic() - started < 3
    assert "timed out" in step(status, "slow")["error_message"]


def test_task_status_and_unknown_tasks(worker):
    uuid = tasker_core.create_task("python_demo", "diamond")
    tasker_core.wait_for_task(uuid, timeout=10)
    status = tasker_core.task_status(uuid)
    assert (status["namespace"], status["name"], status["version"]) == ("python_demo", "diamond", "1.0.0")
    with pytest.raises(tasker_core.TaskNotFoundError, match="not a UUID"):
        tasker_core.task_status("nope")
    with pytest.raises(tasker_core.TaskNotFoundError):
        tasker_core.wait_for_task("00000000-0000-0000-0000-000000000000")


def test_bad_task_requests_name_the_problem(worker):
    with pytest.raises(tasker_core.ConfigurationError, match="unknown template"):
        tasker_core.create_task("python_demo", "nonesuch")
    with pytest.raises(tasker_core.ConfigurationError, match=r"contexts\[1\]"):
        tasker_core.create_tasks("python_demo", "diamond", [{}, [1, 2]])
    with pytest.raises(tasker_core.ConfigurationError, match="not JSON-able"):
        tasker_core.create_task("python_demo", "diamond", context={"x": object()})
    with pytest.raises(ValueError, match="non-negative"):
        tasker_core.wait_for_tasks([], timeout=-1)
    # The worker still runs.
    ok = tasker_core.create_task("python_demo", "diamond")
    assert tasker_core.wait_for_task(ok, timeout=10)["status"] == "complete"


def test_wait_for_task_times_out(worker):
    uuid = tasker_core.create_task("python_failures", "slow", context={"seconds": 0.25})
    with pytest.raises(TimeoutError, match=r"did not finish within 0\.05s"):
        tasker_core.wait_for_task(uuid, timeout=0.05)


def test_stop_wakes_idle_handler_threads_at_once(templates):
    worker = Worker.start({"templates": [templates], "concurrency": 4})
    time.sleep(0.1)
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 1.0
    assert not any(t.is_alive() for t in worker._threads)
    assert tasker_core.ffi.worker_status().state == tasker_core.WorkerState.STOPPED


def test_the_client_needs_a_worker():
    with pytest.raises(tasker_core.WorkerNotInitializedError, match="bootstrap_worker"):
        tasker_core.create_task("python_demo", "diamond")


def test_cancelling_a_task_interrupts_its_running_handler(worker):
    uuid = tasker_core.create_task("python_failures", "cancellable", context={"seconds": 20})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and uuid not in basic.ATTEMPTS:  # the handler runs
        time.sleep(0.01)
    started = time.monotonic()
    assert tasker_core.cancel_task(uuid)
    status = tasker_core.wait_for_task(uuid, timeout=10)
    assert status["status"] == "cancelled"
    assert time.monotonic() - started < 2
    assert basic.ATTEMPTS[uuid + ":interrupted"] == ["StepCancelledError"]
