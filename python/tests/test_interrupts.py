"""Interrupts and shutdowns: waits wake at once, and a step taken is never lost on the way."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import tasker_core
from tasker_core import _tasker_core
from tasker_core.ffi import bootstrap_worker, stop_worker


class Poke(Exception):
    pass


@pytest.fixture
def engine_only(templates):
    """A worker with no handler threads: the test takes the steps itself."""
    bootstrap_worker({"templates": [templates], "concurrency": 2})
    yield
    stop_worker()


def signal_soon(number: int, after: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(after), os.kill(os.getpid(), number)))
    thread.start()
    return thread


def test_ctrl_c_wakes_a_wait_for_task_at_once(engine_only):
    uuid = tasker_core.create_task("default", "noop")
    poker = signal_soon(signal.SIGINT, 0.2)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        tasker_core.wait_for_task(uuid, timeout=30)
    poker.join()
    assert time.monotonic() - started < 0.6


def test_ctrl_c_wakes_a_step_wait_at_once(engine_only):
    poker = signal_soon(signal.SIGINT, 0.2)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _tasker_core._next_step_event(30)
    poker.join()
    assert time.monotonic() - started < 0.6


def complete(event: dict) -> bool:
    return _tasker_core._send_step_completion_event(
        {
            "event_id": event["event_id"],
            "task_uuid": event["task_uuid"],
            "step_uuid": event["step_uuid"],
            "success": True,
            "result": {"ok": True},
        }
    )


def test_a_step_released_by_its_thread_runs_again_without_counting(engine_only):
    uuid = tasker_core.create_task("default", "noop")
    first = _tasker_core._next_step_event(5)
    assert first["task_uuid"] == uuid
    assert _tasker_core._release_held()
    again = _tasker_core._next_step_event(5)
    assert again["step_uuid"] == first["step_uuid"]
    assert again["task_sequence_step"]["workflow_step"]["attempts"] == 1
    assert complete(again)
    assert tasker_core.wait_for_task(uuid, timeout=5)["status"] == "complete"


def test_a_thread_that_ends_holding_a_step_hands_it_back(engine_only):
    uuid = tasker_core.create_task("default", "noop")
    taken = {}
    thread = threading.Thread(target=lambda: taken.update(_tasker_core._next_step_event(5)))
    thread.start()
    thread.join()
    again = _tasker_core._next_step_event(5)
    assert again["step_uuid"] == taken["step_uuid"]
    assert complete(again)
    assert tasker_core.wait_for_task(uuid, timeout=5)["status"] == "complete"


def test_a_late_completion_of_a_handed_back_step_is_refused(engine_only):
    tasker_core.create_task("default", "noop")
    event = _tasker_core._next_step_event(5)
    assert _tasker_core._hand_back_step(event["event_id"])
    assert not complete(event)


def test_no_step_is_lost_to_signals_raised_around_the_hand_off(engine_only):
    # The signal handler raises while the main thread is inside (or just leaving) the take: after
    # the step was taken in Rust, before or after Python stored it. Either the caller gets the step,
    # or the exception and the step goes back (Rust checks signals last; `_release_held` covers an
    # exception raised on the way out).
    armed = [False]

    def raise_if_armed(*_):
        if armed[0]:
            raise Poke()

    previous = signal.signal(signal.SIGUSR1, raise_if_armed)
    stop = threading.Event()

    def poke():
        while not stop.is_set():
            time.sleep(random.uniform(0, 0.002))
            os.kill(os.getpid(), signal.SIGUSR1)

    poker = threading.Thread(target=poke)
    poker.start()
    interrupted = completed = 0
    uuids: list[str] = []
    deadline = time.monotonic() + 30
    try:
        # Rounds of 200 tasks until signals have landed inside the take (a fast machine may take a
        # round's steps between two signals).
        while (interrupted < 5 or completed < len(uuids)) and time.monotonic() < deadline:
            if completed == len(uuids):
                uuids += tasker_core.create_tasks("default", "noop", [{"n": n} for n in range(200)])
            try:
                armed[0] = True
                event = _tasker_core._next_step_event(0.5)
                armed[0] = False
            except Poke:
                armed[0] = False
                interrupted += 1
                _tasker_core._release_held()
                continue
            if event and complete(event):
                completed += 1
    finally:
        armed[0] = False
        stop.set()
        poker.join()
        signal.signal(signal.SIGUSR1, previous)
    statuses = tasker_core.wait_for_tasks(uuids, timeout=10)
    assert {s["status"] for s in statuses} == {"complete"}
    assert completed == len(uuids)
    assert interrupted >= 5


WORKER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import tasker_core
    config = {{"templates": [{templates!r}], "concurrency": 1, "shutdown_timeout": 10}}
    worker = tasker_core.Worker.start(config)
    uuid = tasker_core.create_task("python_failures", "slow", context={{"seconds": 0.25}})
    print(uuid, flush=True)
    worker.run()
    print("stopped", tasker_core.ffi.last_stopped_status().steps_processed, flush=True)
    """
)


def test_sigterm_drains_a_running_step_and_exits(templates):
    tests = os.path.dirname(__file__)
    script = WORKER_SCRIPT.format(tests=tests, templates=templates)
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        process.stdout.readline()
        time.sleep(0.1)  # the step is running
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopped 1" in out


EXIT_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    sys.path.insert(0, {tests!r})
    logging.basicConfig(level=logging.DEBUG)
    import tasker_core
    config = {{"templates": [{templates!r}], "concurrency": 4, "log_level": "debug"}}
    worker = tasker_core.Worker.start(config)
    uuid = tasker_core.create_task("python_demo", "diamond")
    tasker_core.wait_for_task(uuid, timeout=10)
    print("exiting with the worker running", flush=True)
    """
)


def test_exiting_with_a_worker_running_stops_it_cleanly(templates):
    # Daemon threads left waiting in Rust at finalization would abort the process.
    script = EXIT_SCRIPT.format(tests=os.path.dirname(__file__), templates=templates)
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "exiting with the worker running" in done.stdout
        assert "FATAL" not in done.stderr
