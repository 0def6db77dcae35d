"""Log lines from Python and from the engine, both through Python's ``logging``.

Python's lines go to the ``tasker_core`` logger at once, with their fields. The engine's lines are
queued in Rust and carried over by one Python thread (``tasker-core-log-relay``), which waits for them
in Rust with the GIL released: no Rust thread ever calls Python. Each record carries its fields as
``record.tasker_fields`` (a dict) and its Rust module as ``record.tasker_target``; the message ends with
``key=value`` pairs so that a plain formatter shows them too.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any, Optional

from tasker_core import _tasker_core

__all__ = [
    "LOGGER_NAME",
    "TRACE",
    "drain_engine_logs",
    "log",
    "log_debug",
    "log_error",
    "log_info",
    "log_trace",
    "log_warn",
    "logger",
    "start_log_relay",
]

LOGGER_NAME = "tasker_core"
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}

logger = logging.getLogger(LOGGER_NAME)

_relay_lock = threading.Lock()
_relay: Optional[threading.Thread] = None


def _text(message: str, fields: dict[str, Any]) -> str:
    if not fields:
        return message
    return message + " " + " ".join(f"{key}={value}" for key, value in fields.items())


def log(level: str, message: str, context: Optional[dict[str, Any]] = None) -> None:
    """Log ``message`` with ``context`` as its fields at ``level`` (trace, debug, info, warn, error)."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if context is not None and not isinstance(context, dict):
        raise TypeError(f"log context must be a dict, got {type(context).__name__}")
    number = LEVELS[level]
    if logger.isEnabledFor(number):
        fields = dict(context or {})
        logger.log(
            number,
            _text(message, fields),
            extra={"tasker_fields": fields, "tasker_target": "python"},
            stacklevel=3,
        )


def log_trace(message: str, context: Optional[dict[str, Any]] = None) -> None:
    log("trace", message, context)


def log_debug(message: str, context: Optional[dict[str, Any]] = None) -> None:
    log("debug", message, context)


def log_info(message: str, context: Optional[dict[str, Any]] = None) -> None:
    log("info", message, context)


def log_warn(message: str, context: Optional[dict[str, Any]] = None) -> None:
    log("warn", message, context)


def log_error(message: str, context: Optional[dict[str, Any]] = None) -> None:
    log("error", message, context)


def _emit(records: list[tuple[str, str, str, dict[str, Any], int]]) -> None:
    for level, target, message, fields, time_ns in records:
        number = LEVELS.get(level, logging.INFO)
        if not logger.isEnabledFor(number):
            continue
        record = logger.makeRecord(
            LOGGER_NAME,
            number,
            target,
            0,
            _text(message, fields),
            None,
            None,
            extra={"tasker_fields": fields, "tasker_target": target},
        )
        record.created = time_ns / 1e9
        record.msecs = (time_ns // 1_000_000) % 1000
        logger.handle(record)


def drain_engine_logs() -> None:
    """Hand every engine line queued now to ``logging`` (on this thread)."""
    while True:
        records = _tasker_core._next_log_records(0.0)
        if not records:
            return
        _emit(records)


_closing = threading.Event()


def _relay_loop() -> None:
    while not _closing.is_set():
        try:
            records = _tasker_core._next_log_records(None)
        except Exception:  # never lose the relay to one bad record
            logger.exception("tasker_core log relay: a record could not be read")
            continue
        if records is None:
            return
        if records:
            try:
                _emit(records)
            except Exception:
                logger.exception("tasker_core log relay: a record could not be handled")


def start_log_relay() -> None:
    """Start the thread that carries the engine's lines to ``logging`` (once per process)."""
    global _relay
    with _relay_lock:
        if _closing.is_set() or (_relay is not None and _relay.is_alive()):
            return
        _relay = threading.Thread(target=_relay_loop, name="tasker-core-log-relay", daemon=True)
        _relay.start()


def _close_at_exit() -> None:
    # A daemon thread still waiting in Rust when the interpreter finalizes is ended by
    # pthread_exit, whose forced unwind through Rust frames aborts the process ("exception not
    # rethrown"): wake the relay and let it leave first, then hand over what is left.
    _closing.set()
    _tasker_core._wake_waiters()
    relay = _relay
    if relay is not None:
        relay.join(2.0)
    drain_engine_logs()


atexit.register(_close_at_exit)
