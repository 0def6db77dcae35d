"""Scheduled tasks (``create_task(..., run_at=...)``) on the memory backend: their root steps become
ready at ``run_at`` and not before. The margins are wide (a second and more) so that a loaded machine
cannot make a late start look early; nothing here measures speed."""

from __future__ import annotations

import datetime
import math
import threading
import time
from decimal import Decimal

import pytest

import tasker_core
from tasker_core import Worker

UTC = datetime.timezone.utc


@pytest.fixture
def worker(templates):
    with Worker.start({"templates": [templates], "concurrency": 2, "shutdown_timeout": 5}) as running:
        yield running


def started_at(step: dict) -> datetime.datetime:
    # RFC 3339 with milliseconds and a "Z" (which fromisoformat takes from Python 3.11 only).
    return datetime.datetime.fromisoformat(step["started_at"].replace("Z", "+00:00"))


def at_millis(moment: datetime.datetime) -> datetime.datetime:
    """``moment`` cut to the milliseconds ``started_at`` is given in."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def test_a_task_stays_pending_until_run_at_then_runs_every_step(worker):
    run_at = datetime.datetime.now(UTC) + datetime.timedelta(seconds=1.5)
    uuid = tasker_core.create_task("python_demo", "diamond", context={"start": 1}, run_at=run_at)

    time.sleep(0.7)
    early = tasker_core.task_status(uuid)
    assert early["status"] == "pending"
    assert all(s["status"] == "pending" and s["attempts"] == 0 for s in early["steps"])
    assert all(s["started_at"] is None for s in early["steps"])
    with pytest.raises(TimeoutError):
        tasker_core.wait_for_task(uuid, timeout=0.2)

    final = tasker_core.wait_for_task(uuid, timeout=15)
    assert final["status"] == "complete"
    assert min(started_at(s) for s in final["steps"]) >= at_millis(run_at)
    assert [s["result"]["value"] for s in final["steps"] if s["name"] == "d"] == [8]


def test_any_timezone_names_the_same_instant(worker):
    # 1.5 s ahead, written in UTC+05:30: the same moment as in UTC.
    run_at = datetime.datetime.now(UTC).astimezone(datetime.timezone(datetime.timedelta(hours=5, minutes=30)))
    run_at += datetime.timedelta(seconds=1.5)
    uuid = tasker_core.create_task("default", "noop", run_at=run_at)
    time.sleep(0.5)
    assert tasker_core.task_status(uuid)["status"] == "pending"
    final = tasker_core.wait_for_task(uuid, timeout=15)
    assert started_at(final["steps"][0]) >= at_millis(run_at)


def test_a_run_at_in_the_past_starts_now(worker):
    moments = [
        datetime.datetime.now(UTC) - datetime.timedelta(minutes=1),
        datetime.datetime.now(UTC) - datetime.timedelta(days=200),
        time.time() - 60,  # seconds since the epoch, as time.time() gives them
    ]
    uuids = [tasker_core.create_task("default", "noop", run_at=moment) for moment in moments]
    finals = tasker_core.wait_for_tasks(uuids, timeout=10)
    assert [t["status"] for t in finals] == ["complete"] * 3


def test_create_tasks_schedules_every_task(worker):
    run_at = datetime.datetime.now(UTC) + datetime.timedelta(seconds=1)
    uuids = tasker_core.create_tasks("default", "noop", [{}, {}], run_at=run_at)
    assert [tasker_core.task_status(u)["status"] for u in uuids] == ["pending", "pending"]
    finals = tasker_core.wait_for_tasks(uuids, timeout=10)
    assert [t["status"] for t in finals] == ["complete", "complete"]
    assert all(started_at(t["steps"][0]) >= at_millis(run_at) for t in finals)


def test_a_scheduled_task_does_not_hold_up_unscheduled_ones(worker):
    late = tasker_core.create_task(
        "default", "noop", run_at=datetime.datetime.now(UTC) + datetime.timedelta(30)
    )
    now = tasker_core.create_task("default", "noop")
    assert tasker_core.wait_for_task(now, timeout=10)["status"] == "complete"
    assert tasker_core.task_status(late)["status"] == "pending"
    assert tasker_core.cancel_task(late) is True


FAR = datetime.datetime(9999, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (float("nan"), ValueError, r"run_at: must be a finite time"),
        (math.inf, ValueError, r"run_at: must be a finite time"),
        (1e19, ValueError, r"run_at: .* more than 10 years ahead"),
        (10**400, ValueError, r"run_at: .* out of range"),
        (FAR, ValueError, r"run_at: .* more than 10 years ahead \(9999-01-01T00:00:00\+00:00\)"),
        (0, ValueError, r"run_at: .* more than a year in the past"),
        (datetime.datetime(1, 1, 1, tzinfo=UTC), ValueError, r"run_at: .* more than a year in the past"),
        (datetime.datetime.now(), ValueError, r"run_at: a naive datetime .* give it a timezone"),
        (datetime.date.today(), TypeError, r"run_at: must be a timezone-aware datetime .*got date"),
        ("tomorrow", TypeError, r"run_at: must be a timezone-aware datetime .*got str"),
        (True, TypeError, r"run_at: must be a timezone-aware datetime .*got bool"),
        (1 + 2j, TypeError, r"run_at: must be a timezone-aware datetime .*got complex"),
        (Decimal("1"), TypeError, r"run_at: must be a timezone-aware datetime .*got Decimal"),
        (datetime.timedelta(seconds=5), TypeError, r"run_at: must be a timezone-aware datetime .*timedelta"),
    ],
    ids=lambda value: type(value).__name__,
)
def test_a_bad_run_at_is_refused_naming_it_and_the_worker_goes_on(worker, value, error, message):
    with pytest.raises(error, match=message):
        tasker_core.create_task("default", "noop", run_at=value)
    with pytest.raises(error, match=message):
        tasker_core.create_tasks("default", "noop", [{}], run_at=value)
    uuid = tasker_core.create_task("default", "noop")
    assert tasker_core.wait_for_task(uuid, timeout=10)["status"] == "complete"


def test_a_wait_cut_short_by_the_worker_stopping_raises(templates):
    # A task scheduled an hour ahead never finishes; stopping the worker ends the wait for it, and
    # the caller is told so (never given a shorter list than it asked for).
    outcome: list[object] = []
    with Worker.start({"templates": [templates], "concurrency": 1, "shutdown_timeout": 1}) as running:
        later = datetime.datetime.now(UTC) + datetime.timedelta(hours=1)
        uuids = [tasker_core.create_task("default", "noop", run_at=later)]
        uuids.append(tasker_core.create_task("default", "noop"))
        tasker_core.wait_for_task(uuids[1], timeout=10)

        def wait() -> None:
            try:
                outcome.append(tasker_core.wait_for_tasks(uuids, timeout=30))
            except Exception as error:  # the test looks at which one
                outcome.append(error)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.3)
        running.stop()
        waiter.join(10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], tasker_core.WorkerNotInitializedError), outcome
    assert "stopped before answering" in str(outcome[0])
