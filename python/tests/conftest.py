from __future__ import annotations

import os
import pathlib
import sys

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
