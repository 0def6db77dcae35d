"""The handler the benchmark templates name (``bench_handlers.Noop``; this directory is on sys.path)."""

from __future__ import annotations

from tasker_core import StepHandler


class Noop(StepHandler):
    """Does nothing, like the Celery job it is compared with."""

    def call(self, task, sequence, step):
        return {}
