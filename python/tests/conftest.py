from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import uuid as uuidlib

import pytest

HERE = pathlib.Path(__file__).parent
TEMPLATES = HERE / "templates"

# The seed's tests bootstrap with BootstrapConfig() alone: the templates come from the environment.
os.environ.setdefault("TASKER_TEMPLATE_PATH", str(TEMPLATES))
sys.path.insert(0, str(HERE))


@pytest.fixture(autouse=True)
def no_worker_left():
    """Every test starts and ends without a worker running."""
    from tasker_core import _tasker_core

    yield
    if _tasker_core._worker_status()["running"]:
        _tasker_core._stop_worker()


@pytest.fixture
def templates() -> str:
    return str(TEMPLATES)


# PostgreSQL for the backend tests: a fresh database per test, dropped after it.
HOST = os.environ.get("PGHOST", "127.0.0.1")
PORT = os.environ.get("PGPORT", "5432")
USER = os.environ.get("PGUSER", "postgres")


def psql(sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["psql", "-h", HOST, "-p", PORT, "-U", USER, "-d", "postgres", "-tAc", sql],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def database():
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed: no PostgreSQL to test against")
    if psql("SELECT 1").returncode != 0:
        pytest.skip(f"PostgreSQL is not reachable at {HOST}:{PORT}")
    name = f"pyk_{uuidlib.uuid4().hex[:12]}"
    created = psql(f"CREATE DATABASE {name}")
    assert created.returncode == 0, created.stderr
    yield f"postgres://{USER}@{HOST}:{PORT}/{name}"
    psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
