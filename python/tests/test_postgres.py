"""The PostgreSQL backend: the same handlers and templates; a worker killed with SIGKILL loses nothing."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import tasker_core
from tasker_core import Worker

HERE = os.path.dirname(__file__)
TEMPLATES = os.path.join(HERE, "pg_templates")


def config(url: str, **extra) -> dict:
    return {
        "backend": "postgres",
        "database_url": url,
        "templates": [TEMPLATES],
        "concurrency": 2,
        "log_level": "error",
        **extra,
    }


def test_tasks_run_with_retries_on_postgres(database):
    with Worker.start(config(database)):
        diamond = tasker_core.create_task("python_demo", "diamond", context={"start": 2})
        flaky = tasker_core.create_task("python_failures", "flaky", context={"succeed_on": 2})
        done = tasker_core.wait_for_tasks([diamond, flaky], timeout=30)
    assert [s["status"] for s in done] == ["complete", "complete"]
    (d,) = (s for s in done[0]["steps"] if s["name"] == "d")
    assert d["result"] == {"value": 16}
    (f,) = done[1]["steps"]
    assert f["attempts"] == 2


WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {here!r})
    import tasker_core
    tasker_core.Worker.start({config!r}).run()
    """
)


def test_a_scheduled_task_waits_for_run_at_on_postgres(database):
    with Worker.start(config(database)):
        run_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1.5)
        uuid = tasker_core.create_task("python_demo", "diamond", context={"start": 1}, run_at=run_at)
        time.sleep(0.7)
        early = tasker_core.task_status(uuid)
        final = tasker_core.wait_for_task(uuid, timeout=30)
    assert early["status"] == "pending"
    assert all(s["attempts"] == 0 for s in early["steps"])
    assert final["status"] == "complete"
    started = min(s["started_at"] for s in final["steps"])
    assert datetime.datetime.fromisoformat(started.replace("Z", "+00:00")) >= run_at.replace(
        microsecond=run_at.microsecond // 1000 * 1000
    )


def test_a_worker_killed_mid_step_loses_nothing(database):
    # This process creates the tasks (and the schema: two workers migrating one new database at
    # once would race), then a child process runs them and is killed mid-step.
    with Worker.start(config(database, concurrency=1, namespaces=["python_demo"])):
        uuids = tasker_core.create_tasks("python_pg", "long", [{"n": n} for n in range(2)])
    child_config = config(database, claim_lease=1, namespaces=["python_pg"])
    child = subprocess.Popen(
        [sys.executable, "-c", WORKER.format(here=HERE, config=child_config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYK_SPIN": "1"},
    )
    try:
        lines = [child.stdout.readline() for _ in range(2)]
        if not all(lines):
            child.kill()
            pytest.fail(f"the child worker ended early: {child.communicate(timeout=10)[1][-2000:]}")
        assert sorted(line.split()[1] for line in lines) == sorted(uuids)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        child.kill()
    # Another worker takes the abandoned steps over once their claims lapse.
    took_over = time.monotonic()
    with Worker.start(config(database, claim_lease=1, namespaces=["python_pg"])):
        done = tasker_core.wait_for_tasks(uuids, timeout=30)
    assert [s["status"] for s in done] == ["complete", "complete"]
    assert time.monotonic() - took_over < 20
    for status in done:
        first = next(s for s in status["steps"] if s["name"] == "first")
        assert first["result"] == {"pid": os.getpid()}
