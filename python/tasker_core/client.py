"""Creating tasks and following them (like the Ruby client, ``TaskerCore.create_task`` ...)."""

from __future__ import annotations

import datetime
import numbers
from typing import Any, Optional, Union

from tasker_core import _tasker_core

__all__ = [
    "cancel_task",
    "create_task",
    "create_tasks",
    "retry_task",
    "task_status",
    "wait_for_task",
    "wait_for_tasks",
]


RunAt = Union[datetime.datetime, float]
"""When a task starts: a timezone-aware ``datetime``, or seconds since the epoch (``time.time()``)."""


def create_task(
    namespace: str,
    name: str,
    version: str = "1.0.0",
    context: Optional[dict[str, Any]] = None,
    run_at: Optional[RunAt] = None,
) -> str:
    """Create one task of the template ``namespace/name@version``; its uuid.

    ``run_at`` schedules it: its first steps become ready at that time, not before (a time already
    past starts it now). A timezone-aware ``datetime`` or seconds since the epoch.

    Raises:
        TypeError: ``run_at`` of another type (a ``date`` or a ``timedelta`` too)
        ValueError: ``run_at`` naive (no timezone), NaN or infinite, more than 10 years ahead or more
            than a year in the past
    """
    contexts = [{} if context is None else context]
    return _create(namespace, name, version, contexts, run_at)[0]


def create_tasks(
    namespace: str,
    name: str,
    contexts: list[dict[str, Any]],
    version: str = "1.0.0",
    run_at: Optional[RunAt] = None,
) -> list[str]:
    """One task per context in one hand-off to the engine (one transaction on PostgreSQL: all are
    created or none); their uuids, in the order of ``contexts``. ``run_at``: as for :func:`create_task`,
    for every one of them."""
    if not isinstance(contexts, list):
        raise TypeError(f"contexts must be a list of dicts, got {type(contexts).__name__}")
    return _create(namespace, name, version, contexts, run_at)


def _create(
    namespace: str, name: str, version: str, contexts: list[dict[str, Any]], run_at: Optional[RunAt]
) -> list[str]:
    if run_at is None:
        return _tasker_core._create_tasks(namespace, name, version, contexts)
    seconds = _epoch_seconds(run_at)
    try:
        return _tasker_core._create_tasks(namespace, name, version, contexts, seconds)
    except ValueError as error:
        # The engine names the time in seconds since the epoch; the caller gave a datetime.
        if isinstance(run_at, datetime.datetime):
            raise ValueError(f"{error} ({run_at.isoformat()})") from None
        raise


def _epoch_seconds(run_at: object) -> float:
    """``run_at`` as seconds since the epoch (the engine checks the range)."""
    if isinstance(run_at, datetime.datetime):
        if run_at.utcoffset() is None:
            # Local time or UTC? datetime.timestamp() would guess local time; a scheduler must not.
            raise ValueError(
                f"run_at: a naive datetime ({run_at.isoformat()}) is ambiguous: give it a timezone, "
                "e.g. datetime.now(timezone.utc) + timedelta(minutes=5)"
            )
        return run_at.timestamp()
    if isinstance(run_at, numbers.Real) and not isinstance(run_at, bool):
        try:
            return float(run_at)
        except OverflowError:
            raise ValueError(f"run_at: {run_at} seconds since the epoch is out of range") from None
    raise TypeError(
        f"run_at: must be a timezone-aware datetime (or seconds since the epoch), got {type(run_at).__name__}"
    )


def task_status(task_uuid: str) -> dict[str, Any]:
    """{task_uuid, namespace, name, version, status, created_at, completed_at, steps: [...]}."""
    return _tasker_core._task_status(task_uuid)


def wait_for_task(task_uuid: str, timeout: Optional[float] = 30) -> dict[str, Any]:
    """Wait (GIL released) until the task completes, errors or is cancelled; its final status.

    Raises:
        TimeoutError: past ``timeout`` seconds (None waits forever)
        TaskNotFoundError: for a uuid this worker never created
    """
    found = _tasker_core._wait_for_tasks([task_uuid], timeout)
    if found is None:
        raise TimeoutError(f"task {task_uuid} did not finish within {timeout}s")
    return found[0]


def wait_for_tasks(task_uuids: list[str], timeout: Optional[float] = 30) -> list[dict[str, Any]]:
    """Wait until every task has finished; their final statuses in the order of ``task_uuids``."""
    found = _tasker_core._wait_for_tasks(list(task_uuids), timeout)
    if found is None:
        raise TimeoutError(f"{len(task_uuids)} tasks did not all finish within {timeout}s")
    return found


def cancel_task(task_uuid: str) -> bool:
    """Stop a task; False if it had already finished."""
    return _tasker_core._cancel_task(task_uuid)


def retry_task(task_uuid: str) -> bool:
    """Run an ``error`` or ``cancelled`` task again from its unfinished steps."""
    return _tasker_core._retry_task(task_uuid)
