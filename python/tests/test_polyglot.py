"""One workflow, two languages: a Ruby worker process and a Python worker process share a PostgreSQL
database; each runs the steps of its namespace and reads the other's results."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

import pytest

import tasker_core
from tasker_core import Worker

HERE = pathlib.Path(__file__).parent
POLYGLOT = HERE / "polyglot"
REPO = HERE.parent.parent
RUBY_LIB = REPO / "lib"


def ruby_extension_built() -> bool:
    """`rake compile` leaves the Ruby extension in lib/ (CI runs it before the Python tests)."""
    return any(p.suffix in (".so", ".bundle") for p in (RUBY_LIB / "tasker_core").glob("tasker_core.*"))


@pytest.fixture
def ruby_worker(database):
    if shutil.which("ruby") is None:
        pytest.skip("ruby is not installed: no Ruby worker to run the Ruby steps")
    if not ruby_extension_built():
        pytest.skip("the Ruby extension is not built in this checkout (run `rake compile` first)")
    config = {
        "backend": "postgres",
        "database_url": database,
        "templates": [str(POLYGLOT / "templates")],
        "namespaces": ["polyglot"],
        "concurrency": 2,
        "log_level": "warn",
    }
    process = subprocess.Popen(
        ["ruby", "-I", str(RUBY_LIB), str(POLYGLOT / "ruby_worker.rb"), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    if not line.startswith("READY"):
        process.kill()
        _, err = process.communicate(timeout=10)
        pytest.fail(f"the Ruby worker did not start: {line!r} {err}")
    yield process
    process.stdin.close()
    assert process.wait(timeout=30) == 0, process.stderr.read()


def test_a_task_runs_its_steps_in_ruby_and_python(database, ruby_worker):
    python_config = {
        "backend": "postgres",
        "database_url": database,
        "templates": [str(POLYGLOT / "templates")],
        "namespaces": ["polyglot_py"],
        "concurrency": 2,
        "log_level": "warn",
    }
    with Worker.start(python_config):
        contexts = [{"items": [10, 20, 30 + i]} for i in range(5)]
        uuids = [tasker_core.create_task("polyglot", "order_score", context=c) for c in contexts]
        finals = tasker_core.wait_for_tasks(uuids, timeout=60)

    assert [f["status"] for f in finals] == ["complete"] * 5, [
        (s["name"], s["status"], s.get("error_message")) for s in finals[0]["steps"]
    ]
    for i, final in enumerate(finals):
        steps = {s["name"]: s for s in final["steps"]}
        ruby_pids = {steps[name]["result"]["pid"] for name in ("fetch", "tax", "total")}
        python_pids = {steps[name]["result"]["pid"] for name in ("score", "receipt")}
        assert ruby_pids == {ruby_worker.pid}
        assert python_pids == {os.getpid()}
        value = 60 + i
        # Python read what Ruby fetched; Ruby added what Python scored; Python read Ruby's total.
        assert steps["score"]["result"]["score"] == value * 2
        assert steps["score"]["result"]["items_from"] == "ruby"
        assert steps["total"]["result"]["score_from"] == "python"
        assert steps["total"]["result"]["total"] == pytest.approx(value * 2 + value / 10)
        assert steps["receipt"]["result"]["receipt"] == f"total {value * 2 + value / 10:.1f}"
        assert steps["receipt"]["result"]["total_from"] == "ruby"
