"""Log lines from Python and from Rust reach Python's logging (the tasker_core logger) with their fields."""

from __future__ import annotations

import logging
import time

import pytest

from tasker_core import _tasker_core
from tasker_core.ffi import log_debug, log_error, log_info, log_trace, log_warn
from tasker_core.log import TRACE, start_log_relay


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=TRACE)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected():
    logger = logging.getLogger("tasker_core")
    handler = Collect()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(TRACE)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def wait_for(records, predicate, seconds=2.0):
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        found = [r for r in records if predicate(r)]
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"no such record among {[r.getMessage() for r in records]}")


def test_python_lines_carry_their_fields_and_level(collected):
    log_info("order placed", {"order_id": 42, "total": 9.5})
    log_warn("slow", {"ms": 300})
    log_error("broken")
    log_debug("details", {"a": 1})
    log_trace("very fine")
    info, warn, error, debug, trace = collected
    assert info.levelno == logging.INFO and info.tasker_fields == {"order_id": 42, "total": 9.5}
    assert info.getMessage() == "order placed order_id=42 total=9.5"
    assert (warn.levelno, error.levelno, debug.levelno, trace.levelno) == (
        logging.WARNING,
        logging.ERROR,
        logging.DEBUG,
        TRACE,
    )
    assert error.tasker_fields == {}


def test_bad_log_calls_name_the_problem():
    with pytest.raises(TypeError, match="context must be a dict"):
        log_info("x", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log level 'loud'"):
        from tasker_core.log import log

        log("loud", "x")


def test_rust_lines_reach_python_logging_through_the_relay_thread(collected):
    start_log_relay()
    _tasker_core._emit_test_log("warn", "from the engine", "rust-side")
    record = wait_for(collected, lambda r: r.getMessage().startswith("from the engine"))
    assert record.levelno == logging.WARNING
    assert record.tasker_fields == {"detail": "rust-side"}
    assert record.tasker_target.startswith("_tasker_core")
    assert record.threadName == "tasker-core-log-relay"


def test_the_engine_level_filters_rust_lines(collected):
    start_log_relay()
    _tasker_core._set_log_level("error")
    try:
        _tasker_core._emit_test_log("info", "filtered out", "x")
        _tasker_core._emit_test_log("error", "kept", "x")
        wait_for(collected, lambda r: r.getMessage().startswith("kept"))
        assert not [r for r in collected if r.getMessage().startswith("filtered out")]
    finally:
        _tasker_core._set_log_level("info")
    with pytest.raises(Exception, match="log_level"):
        _tasker_core._set_log_level("loud")


def test_engine_lines_of_a_worker_arrive(collected, templates):
    from tasker_core import Worker

    with Worker.start({"templates": [templates], "concurrency": 1}):
        pass
    wait_for(collected, lambda r: getattr(r, "tasker_target", "").startswith("tasker_worker"))
