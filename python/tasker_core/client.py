"""Creating tasks and following them (like the Ruby client, ``TaskerCore.create_task`` ...)."""

from __future__ import annotations

from typing import Any, Optional

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


def create_task(
    namespace: str, name: str, version: str = "1.0.0", context: Optional[dict[str, Any]] = None
) -> str:
    """Create one task of the template ``namespace/name@version``; its uuid."""
    return _tasker_core._create_tasks(namespace, name, version, [{} if context is None else context])[0]


def create_tasks(
    namespace: str, name: str, contexts: list[dict[str, Any]], version: str = "1.0.0"
) -> list[str]:
    """One task per context in one hand-off to the engine (one transaction on PostgreSQL: all are
    created or none); their uuids, in the order of ``contexts``."""
    if not isinstance(contexts, list):
        raise TypeError(f"contexts must be a list of dicts, got {type(contexts).__name__}")
    return _tasker_core._create_tasks(namespace, name, version, contexts)


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
