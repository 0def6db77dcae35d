"""The worker's lifecycle and logging, as the seed plan names them (the Ruby side's
``TaskerCore::FFI``)."""

from __future__ import annotations

from typing import Any, Optional, Union

from tasker_core import _tasker_core
from tasker_core.log import log_debug, log_error, log_info, log_trace, log_warn, start_log_relay
from tasker_core.models import BootstrapConfig, BootstrapResult, WorkerStatus

__all__ = [
    "bootstrap_worker",
    "last_stopped_status",
    "log_debug",
    "log_error",
    "log_info",
    "log_trace",
    "log_warn",
    "stop_worker",
    "transition_to_graceful_shutdown",
    "worker_status",
]


def bootstrap_worker(config: Union[BootstrapConfig, dict[str, Any], None] = None) -> BootstrapResult:
    """Initialize the worker system (one per process).

    Raises:
        WorkerBootstrapError: if a worker already runs or it could not start
        ConfigurationError: naming the key (or template file and step) that is wrong
    """
    if config is None:
        config = BootstrapConfig()
    elif isinstance(config, dict):
        config = BootstrapConfig.model_validate(config)
    start_log_relay()
    result = _tasker_core._bootstrap_worker(config.to_engine())
    return BootstrapResult.model_validate(result)


def stop_worker() -> bool:
    """Stop the worker gracefully: running steps finish (up to ``shutdown_timeout``).

    Raises:
        WorkerNotInitializedError: if no worker runs
    """
    return _tasker_core._stop_worker()


def worker_status() -> WorkerStatus:
    """The current worker's status (``state`` stopped when none runs)."""
    return WorkerStatus.model_validate(_tasker_core._worker_status())


def last_stopped_status() -> Optional[WorkerStatus]:
    """The final status of the last worker this process stopped, or None."""
    status = _tasker_core._last_stopped_status()
    return None if status is None else WorkerStatus.model_validate(status)


def transition_to_graceful_shutdown() -> bool:
    """Start no new step; running ones finish. Returns once the state reads ``shutting_down``."""
    return _tasker_core._transition_to_graceful_shutdown()


_ = (log_trace, log_debug, log_info, log_warn, log_error)
