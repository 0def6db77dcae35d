"""Resolving a template's ``handler.callable`` ("package.module.ClassName") to a handler class."""

from __future__ import annotations

import importlib
import threading
from typing import Optional

from tasker_core.handler import StepHandler

__all__ = ["HandlerNotFoundError", "HandlerRegistry"]


class HandlerNotFoundError(LookupError):
    """The callable names no importable StepHandler subclass."""


class HandlerRegistry:
    """Classes registered by name win; any other callable is imported (once, then cached)."""

    _instance: Optional[HandlerRegistry] = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._classes: dict[str, type[StepHandler]] = {}
        self._lock = threading.Lock()

    @classmethod
    def instance(cls) -> HandlerRegistry:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def register(self, callable_name: str, handler_class: type[StepHandler]) -> None:
        if not (isinstance(handler_class, type) and issubclass(handler_class, StepHandler)):
            raise TypeError(f"{handler_class!r} is not a StepHandler subclass")
        with self._lock:
            self._classes[callable_name] = handler_class

    def resolve(self, callable_name: str) -> type[StepHandler]:
        """The class named ``callable_name``; HandlerNotFoundError says why when there is none."""
        with self._lock:
            found = self._classes.get(callable_name)
        if found is not None:
            return found
        module_name, _, class_name = callable_name.rpartition(".")
        if not module_name:
            raise HandlerNotFoundError(
                f"handler {callable_name!r} is not a dotted path (package.module.Class)"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise HandlerNotFoundError(
                f"handler {callable_name}: cannot import module {module_name}: {error}"
            ) from error
        handler_class = getattr(module, class_name, None)
        if not (isinstance(handler_class, type) and issubclass(handler_class, StepHandler)):
            what = "not found" if handler_class is None else "not a tasker_core.StepHandler subclass"
            raise HandlerNotFoundError(f"handler {callable_name}: {class_name} is {what} in {module_name}")
        with self._lock:
            self._classes.setdefault(callable_name, handler_class)
        return handler_class
