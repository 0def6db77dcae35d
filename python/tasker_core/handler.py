"""Step handlers: subclass :class:`StepHandler` and define ``call(task, sequence, step)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["StepDefinition", "StepHandler", "StepResult", "StepSequence", "Task", "WorkflowStep"]


@dataclass(frozen=True)
class StepResult:
    """What a handler may return to attach metadata to its result."""

    result: Any
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    task_uuid: str
    namespace: str
    name: str
    version: str
    context: dict[str, Any]


@dataclass(frozen=True)
class WorkflowStep:
    step_uuid: str
    name: str
    attempts: int
    max_attempts: int
    retryable: bool

    @property
    def last_attempt(self) -> bool:
        """Whether a failure of this attempt ends the step (no attempt left, or not retryable)."""
        return not self.retryable or self.attempts >= self.max_attempts


@dataclass(frozen=True)
class StepDefinition:
    name: str
    handler: dict[str, Any]
    dependencies: list[str]
    retry: dict[str, Any]
    timeout_seconds: float
    on_timeout: str

    @property
    def callable(self) -> str:
        return self.handler["callable"]

    @property
    def initialization(self) -> dict[str, Any]:
        return self.handler.get("initialization") or {}


@dataclass(frozen=True)
class StepSequence:
    """The step's place in its task: the task, the step, its dependencies' results, its definition."""

    task: Task
    workflow_step: WorkflowStep
    dependency_results: dict[str, Any]
    step_definition: StepDefinition

    def get_result(self, step_name: str) -> Any:
        """The result of the dependency ``step_name`` (KeyError naming it if it is not one)."""
        try:
            return self.dependency_results[step_name]
        except KeyError:
            known = ", ".join(sorted(self.dependency_results)) or "none"
            raise KeyError(
                f"{step_name!r} is not a dependency of this step (dependencies: {known})"
            ) from None

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> StepSequence:
        data = event["task_sequence_step"]
        return cls(
            task=Task(**data["task"]),
            workflow_step=WorkflowStep(**data["workflow_step"]),
            dependency_results=data["dependency_results"],
            step_definition=StepDefinition(**data["step_definition"]),
        )


class StepHandler:
    """Base class of step handlers.

    Define ``call(task, sequence, step)``:

    - return a dict (the step's result; anything JSON-able) or ``StepResult(result, metadata)``;
    - raise :class:`tasker_core.RetryableError` (optionally ``retry_after=``) or any ``Exception`` to
      retry (within the template's ``retry.max_attempts``);
    - raise :class:`tasker_core.PermanentError` to fail the step at once.

    ``config`` is the template's ``handler.initialization``. One instance runs one attempt.
    """

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        self.config = config or {}

    def call(self, task: Task, sequence: StepSequence, step: WorkflowStep) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define call(task, sequence, step)")

    def success(self, result: Any, metadata: Optional[dict[str, Any]] = None) -> StepResult:
        return StepResult(result=result, metadata=metadata or {})
