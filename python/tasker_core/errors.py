"""The error hierarchy.

The classes the engine raises are defined by the native extension (so Rust raises them as soon as it
loads); the ones handlers raise are defined here on top of them.
"""

from __future__ import annotations

from tasker_core._tasker_core import (
    ConfigurationError,
    FFIError,
    TaskerError,
    TaskNotFoundError,
    WorkerBootstrapError,
    WorkerNotInitializedError,
)

__all__ = [
    "ConfigurationError",
    "FFIError",
    "PermanentError",
    "RetryableError",
    "Shutdown",
    "StepCancelledError",
    "StepTimeoutError",
    "TaskNotFoundError",
    "TaskerError",
    "WorkerBootstrapError",
    "WorkerNotInitializedError",
]


class RetryableError(TaskerError):
    """Raised by a handler: the attempt failed and may be retried, not before ``retry_after`` seconds
    if given (the template's backoff otherwise)."""

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(TaskerError):
    """Raised by a handler: the step fails now, whatever attempts remain."""


class StepTimeoutError(TaskerError):
    """Raised inside a running handler by the worker when its attempt outlived ``timeout_seconds``.
    The attempt is already over: clean up and return."""


class StepCancelledError(StepTimeoutError):
    """Raised inside a running handler whose task was cancelled (``tasker_core.cancel_task``)."""


class Shutdown(BaseException):
    """Raised into a handler still running when a shutdown passes its deadline, after its step was
    handed back. A BaseException: ``except Exception`` does not swallow it."""
