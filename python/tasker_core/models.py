"""Pydantic v2 models of what crosses the FFI boundary."""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BootstrapConfig", "BootstrapResult", "WorkerState", "WorkerStatus"]

LOG_LEVEL_PATTERN = "^(trace|debug|info|warn|error)$"


class BootstrapConfig(BaseModel):
    """Configuration for worker bootstrap: the keys of the Ruby worker's config, plus the seed's
    ``namespace`` (when set and ``namespaces`` is not: the one namespace this worker runs; unset, the
    worker runs every namespace of its templates) and ``config_path`` (a YAML file of config keys; the
    fields set here win over it)."""

    model_config = ConfigDict(extra="forbid")

    worker_id: Optional[str] = None
    namespace: str = "default"
    config_path: Optional[str] = None
    log_level: str = Field(default="info", pattern=LOG_LEVEL_PATTERN)

    namespaces: Optional[list[str]] = None
    backend: Optional[str] = Field(default=None, pattern="^(memory|postgres)$")
    database_url: Optional[str] = None
    deployment_mode: Optional[str] = Field(default=None, pattern="^(Hybrid|EventDriven|Polling)$")
    concurrency: Optional[int] = Field(default=None, ge=1, le=1024)
    templates: Optional[list[str]] = None
    event_driven_enabled: Optional[bool] = None
    environment: Optional[str] = None
    poll_interval: Optional[float] = None
    shutdown_timeout: Optional[float] = None
    task_retention: Optional[int] = None
    task_index_retention: Optional[int] = None
    database_pool_size: Optional[int] = None
    finished_task_ttl: Optional[float] = None
    claim_lease: Optional[float] = None
    validate_handlers: Optional[bool] = None
    enable_web_api: Optional[bool] = None
    web_api_bind: Optional[str] = None
    web_api_token: Optional[str] = None

    def to_engine(self) -> dict[str, Any]:
        """The dict the engine reads: the file's keys, then the fields set here; ``namespace`` becomes
        ``namespaces`` when those are not given."""
        from tasker_core import _tasker_core

        merged: dict[str, Any] = {}
        if self.config_path is not None:
            merged.update(_tasker_core._load_config_file(self.config_path))
        fields = self.model_dump(exclude={"namespace", "config_path"}, exclude_none=True)
        # log_level left at its default changes nothing (TASKER_LOG_LEVEL, or the file, decides).
        if "log_level" not in self.model_fields_set:
            fields.pop("log_level", None)
        merged.update(fields)
        # `namespace` narrows the worker to one namespace only when given; left at its default the
        # worker runs every namespace its templates name (the Ruby default).
        if merged.get("namespaces") is None and "namespace" in self.model_fields_set:
            merged["namespaces"] = [self.namespace]
        if isinstance(merged.get("templates"), str):
            merged["templates"] = [merged["templates"]]
        return merged


class BootstrapResult(BaseModel):
    """Result from worker bootstrap."""

    model_config = ConfigDict(extra="forbid")

    success: bool
    handle_id: str
    worker_id: str
    status: str
    concurrency: Optional[int] = None
    error_message: Optional[str] = None


class WorkerState(str, Enum):
    """Worker lifecycle states."""

    STARTING = "starting"
    RUNNING = "running"
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"
    ERROR = "error"


class WorkerStatus(BaseModel):
    """Current worker status (the fields after ``steps_failed`` are the Ruby status's others)."""

    model_config = ConfigDict(extra="forbid")

    state: WorkerState
    worker_id: Optional[str] = None
    uptime_seconds: float = 0.0
    steps_processed: int = 0
    steps_failed: int = 0
    running: bool = False
    quiet: bool = False
    handle_id: Optional[str] = None
    environment: Optional[str] = None
    backend: Optional[str] = None
    deployment_mode: Optional[str] = None
    concurrency: Optional[int] = None
    steps_in_flight: int = 0
    supported_namespaces: list[str] = Field(default_factory=list)
    web_api_enabled: bool = False
    web_api_bind: Optional[str] = None
    database_pool_size: int = 0
    database_pool_idle: int = 0


JSONValue = Union[dict[str, Any], list[Any], str, int, float, bool, None]
