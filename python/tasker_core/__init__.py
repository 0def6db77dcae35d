"""tasker_core for Python: workers for the tasker_core workflow engine.

The engine (templates, tasks, dispatch, retries, the memory and PostgreSQL backends) is the Rust crate
the Ruby gem uses too; this package is its Python face. The native part is the private extension
``tasker_core._tasker_core``; everything public is re-exported here.
"""

from __future__ import annotations

from tasker_core import ffi
from tasker_core._tasker_core import __version__
from tasker_core.client import (
    cancel_task,
    create_task,
    create_tasks,
    retry_task,
    task_status,
    wait_for_task,
    wait_for_tasks,
)
from tasker_core.errors import (
    ConfigurationError,
    FFIError,
    PermanentError,
    RetryableError,
    Shutdown,
    StepCancelledError,
    StepTimeoutError,
    TaskerError,
    TaskNotFoundError,
    WorkerBootstrapError,
    WorkerNotInitializedError,
)
from tasker_core.handler import StepHandler, StepResult, StepSequence, Task, WorkflowStep
from tasker_core.models import BootstrapConfig, BootstrapResult, WorkerState, WorkerStatus
from tasker_core.registry import HandlerNotFoundError, HandlerRegistry
from tasker_core.worker import Worker

__all__ = [
    "BootstrapConfig",
    "BootstrapResult",
    "ConfigurationError",
    "FFIError",
    "HandlerNotFoundError",
    "HandlerRegistry",
    "PermanentError",
    "RetryableError",
    "Shutdown",
    "StepCancelledError",
    "StepHandler",
    "StepResult",
    "StepSequence",
    "StepTimeoutError",
    "Task",
    "TaskNotFoundError",
    "TaskerError",
    "Worker",
    "WorkerBootstrapError",
    "WorkerNotInitializedError",
    "WorkerState",
    "WorkerStatus",
    "WorkflowStep",
    "__version__",
    "cancel_task",
    "create_task",
    "create_tasks",
    "ffi",
    "retry_task",
    "task_status",
    "wait_for_task",
    "wait_for_tasks",
]
