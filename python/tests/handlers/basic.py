"""Handlers the test templates name (``handlers.basic.X``; tests/ is on sys.path)."""

from __future__ import annotations

import sys
import threading
import time

from tasker_core import PermanentError, RetryableError, StepHandler, StepResult

# Attempts seen per task, for the retry tests.
ATTEMPTS: dict[str, list[int]] = {}
LOCK = threading.Lock()


def seen(task_uuid: str, attempt: int) -> None:
    with LOCK:
        ATTEMPTS.setdefault(task_uuid, []).append(attempt)


class Echo(StepHandler):
    def call(self, task, sequence, step):
        return {"echo": task.context, "step": step.name}


class Double(StepHandler):
    def call(self, task, sequence, step):
        if sequence.dependency_results:
            (value,) = (result["value"] for result in sequence.dependency_results.values())
        else:
            value = task.context.get("start", self.config.get("start", 1))
        return {"value": value * 2}


class Sum(StepHandler):
    def call(self, task, sequence, step):
        total = sequence.get_result("b")["value"] + sequence.get_result("c")["value"]
        return StepResult(result={"value": total}, metadata={"summed": ["b", "c"]})


class Flaky(StepHandler):
    """Fails until the attempt named in the context (``succeed_on``)."""

    def call(self, task, sequence, step):
        seen(task.task_uuid, step.attempts)
        if step.attempts < task.context.get("succeed_on", 99):
            raise RuntimeError(f"attempt {step.attempts} failed")
        return {"attempt": step.attempts}


class Refuse(StepHandler):
    def call(self, task, sequence, step):
        seen(task.task_uuid, step.attempts)
        raise PermanentError("no point in retrying")


class RetryLater(StepHandler):
    def call(self, task, sequence, step):
        seen(task.task_uuid, step.attempts)
        if step.attempts == 1:
            raise RetryableError("not yet", retry_after=0.4)
        return {"at": time.monotonic()}


class Spin(StepHandler):
    """Runs past its timeout in short sleeps (a timeout is raised between bytecodes)."""

    def call(self, task, sequence, step):
        seen(task.task_uuid, step.attempts)
        until = time.monotonic() + task.context.get("seconds", 5)
        try:
            while time.monotonic() < until:
                time.sleep(0.01)
        except BaseException as error:
            with LOCK:
                ATTEMPTS.setdefault(task.task_uuid + ":interrupted", []).append(type(error).__name__)
            raise
        return {"spun": True}


class ReturnsASet(StepHandler):
    def call(self, task, sequence, step):
        return {"not json": {1, 2, 3}}


class SpinWhenAsked(StepHandler):
    """Spins (a step in progress) in a process started with PYK_SPIN=1; returns at once elsewhere."""

    def call(self, task, sequence, step):
        import os

        if os.environ.get("PYK_SPIN") == "1":
            # One write per line: print() writes its parts separately, and two threads interleave.
            sys.stdout.write(f"spinning {task.task_uuid}\n")
            sys.stdout.flush()
            while True:
                time.sleep(0.01)
        return {"pid": os.getpid()}
