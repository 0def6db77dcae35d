"""The Python worker: handler threads that take steps from the engine and run them.

Each handler thread waits for its next step inside Rust with the GIL released. A step taken is held
by its thread until the thread completes it; whatever ends the thread's turn early (an exception, a
shutdown) hands the step back to the engine (the attempt does not count, the step is ready again).

Timeouts: the engine ends an attempt that outlives the step's ``timeout_seconds`` (a failed attempt,
retried like any other) and names it on its interrupt port; the interrupter thread then raises
:class:`StepTimeoutError` into the handler's thread, which lands in that handler or nowhere. Python
raises such an exception between bytecodes: a handler blocked in one long C call (``time.sleep``, a
socket read) sees it when that call returns.
"""

from __future__ import annotations

import atexit
import ctypes
import signal
import threading
import time
import traceback
import weakref
from typing import Any, Optional, Union

from tasker_core import _tasker_core
from tasker_core.errors import (
    PermanentError,
    RetryableError,
    Shutdown,
    StepCancelledError,
    StepTimeoutError,
)
from tasker_core.ffi import bootstrap_worker, worker_status
from tasker_core.handler import StepResult, StepSequence
from tasker_core.log import log, logger, start_log_relay
from tasker_core.models import BootstrapConfig, BootstrapResult, WorkerStatus
from tasker_core.registry import HandlerNotFoundError, HandlerRegistry

__all__ = ["Worker"]

# Two prototypes of one C function: an exception class to raise, or NULL to clear a pending one.
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


def _raise_in(thread_id: int, exception: Optional[type[BaseException]]) -> None:
    """Raise ``exception`` in the thread at its next bytecode (None: clear one still pending)."""
    if exception is None:
        _clear_async_exc(thread_id, None)
    else:
        _set_async_exc(thread_id, exception)


class _Slot:
    """What one handler thread runs now; the lock makes 'raise into this handler' and 'the handler
    has returned' exclusive."""

    __slots__ = ("event_id", "lock", "thread_id")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.event_id: Optional[str] = None
        self.thread_id = 0


_running_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    # Handler threads are daemons waiting in Rust; at finalization Python would end them with
    # pthread_exit, whose forced unwind through Rust frames aborts the process. A worker left
    # running is stopped here first (draining its steps, as stop() does).
    for worker in list(_running_workers):
        worker.stop()


class Worker:
    """A running worker: ``Worker.start(config)``, then ``stop()`` (or use it as a context manager).
    A worker still running when the interpreter exits is stopped then."""

    def __init__(
        self, result: BootstrapResult, concurrency: int, registry: HandlerRegistry, shutdown_timeout: float
    ) -> None:
        self.bootstrap_result = result
        self.registry = registry
        self.shutdown_timeout = shutdown_timeout
        self._slots: list[_Slot] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._stopped = False
        for index in range(concurrency):
            slot = _Slot()
            thread = threading.Thread(
                target=self._work, args=(slot,), name=f"tasker-handler-{index}", daemon=True
            )
            self._slots.append(slot)
            self._threads.append(thread)
        self._interrupter = threading.Thread(target=self._interrupts, name="tasker-interrupter", daemon=True)

    @classmethod
    def start(
        cls,
        config: Union[BootstrapConfig, dict[str, Any], None] = None,
        registry: Optional[HandlerRegistry] = None,
    ) -> Worker:
        """Bootstrap the engine and start ``concurrency`` handler threads (default 4)."""
        if config is None:
            config = BootstrapConfig()
        elif isinstance(config, dict):
            config = BootstrapConfig.model_validate(config)
        start_log_relay()
        result = bootstrap_worker(config)
        engine = config.to_engine()
        worker = cls(
            result,
            result.concurrency or 4,
            registry or HandlerRegistry.instance(),
            float(engine.get("shutdown_timeout", 30.0)),
        )
        _running_workers.add(worker)
        for thread in worker._threads:
            thread.start()
        worker._interrupter.start()
        return worker

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def worker_id(self) -> str:
        return self.bootstrap_result.worker_id

    def status(self) -> WorkerStatus:
        return worker_status()

    def run(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Block the main thread until one of ``signals`` arrives, then stop (draining running steps).
        For a worker process: ``Worker.start(config).run()``."""
        received = threading.Event()
        previous = {number: signal.signal(number, lambda *_: received.set()) for number in signals}
        try:
            while not received.wait(0.5):
                pass
            log("info", "signal received: stopping the worker", {"worker_id": self.worker_id})
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            self.stop()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Start no new step, let running ones finish (up to ``timeout``, default the config's
        ``shutdown_timeout``), hand back the steps of handlers still running past it and raise
        :class:`Shutdown` into them, then stop the engine. Idempotent."""
        if self._stopped:
            return
        self._stopping = True
        deadline = time.monotonic() + (self.shutdown_timeout if timeout is None else timeout)
        try:
            _tasker_core._transition_to_graceful_shutdown()
        except Exception:  # the engine already ended (it failed): stop_worker below clears it
            pass
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = [(slot, thread) for slot, thread in zip(self._slots, self._threads) if thread.is_alive()]
        for slot, thread in busy:
            with slot.lock:
                if slot.event_id is not None:
                    handed = _tasker_core._hand_back_step(slot.event_id)
                    log(
                        "warn",
                        f"shutdown deadline passed: {'step handed back, ' if handed else ''}"
                        "raising Shutdown in its handler",
                        {"event_id": slot.event_id, "thread": thread.name},
                    )
                    _raise_in(slot.thread_id, Shutdown)
        for _slot, thread in busy:
            thread.join(2.0)
            if thread.is_alive():
                log(
                    "error",
                    "handler ignored Shutdown and is still running: left behind",
                    {"thread": thread.name},
                )
        try:
            _tasker_core._stop_worker()
        except Exception as error:
            if type(error).__name__ != "WorkerNotInitializedError":
                raise
        self._interrupter.join(2.0)
        self._stopped = True
        _running_workers.discard(self)

    # -- handler threads ------------------------------------------------------------------------

    def _work(self, slot: _Slot) -> None:
        slot.thread_id = threading.get_ident()
        while not self._stopping:
            try:
                event = _tasker_core._next_step_event(None)
                if event is None:
                    break
                if event is False:
                    continue
                self._run(slot, event)
            except Shutdown:
                break
            except StepTimeoutError:
                continue  # an interrupt that arrived after its handler returned: nothing to stop
            except BaseException as error:
                logger.error("handler thread error; going on", exc_info=error)
            finally:
                # A step taken and not completed (an exception between the two) goes back.
                _tasker_core._release_held()

    def _run(self, slot: _Slot, event: dict[str, Any]) -> None:
        completion = self._execute(slot, event)
        try:
            _tasker_core._send_step_completion_event(completion)
        except (TypeError, ValueError) as error:
            # The completion itself was refused (a result that is not JSON-able): fail the step.
            _tasker_core._send_step_completion_event(self._failure(event, error, retryable=False))

    def _execute(self, slot: _Slot, event: dict[str, Any]) -> dict[str, Any]:
        try:
            sequence = StepSequence.from_event(event)
            definition = sequence.step_definition
            try:
                handler_class = self.registry.resolve(definition.callable)
            except HandlerNotFoundError as error:
                return self._failure(event, error, retryable=False)
            handler = handler_class(config=definition.initialization)
            with slot.lock:
                slot.event_id = event["event_id"]
            try:
                returned = handler.call(sequence.task, sequence, sequence.workflow_step)
            finally:
                with slot.lock:
                    slot.event_id = None
                    # An interrupt raised for this handler and not delivered yet dies here.
                    _raise_in(slot.thread_id, None)
            return self._success(event, returned)
        except Shutdown:
            raise
        except StepTimeoutError as error:
            log("info", "step handler interrupted", self._fields(event))
            return self._failure(event, error, retryable=True, quiet=True)
        except RetryableError as error:
            return self._failure(event, error, retryable=True, retry_after=error.retry_after)
        except PermanentError as error:
            return self._failure(event, error, retryable=False)
        except Exception as error:
            return self._failure(event, error, retryable=True)
        except BaseException as error:
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            return self._failure(event, error, retryable=False)

    @staticmethod
    def _fields(event: dict[str, Any]) -> dict[str, Any]:
        step = event["task_sequence_step"]["workflow_step"]
        return {"task_uuid": event["task_uuid"], "step": step["name"], "attempt": step["attempts"]}

    @staticmethod
    def _success(event: dict[str, Any], returned: Any) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        if isinstance(returned, StepResult):
            metadata = returned.metadata
            returned = returned.result
        return {
            "event_id": event["event_id"],
            "task_uuid": event["task_uuid"],
            "step_uuid": event["step_uuid"],
            "success": True,
            "result": returned,
            "metadata": metadata,
        }

    def _failure(
        self,
        event: dict[str, Any],
        error: BaseException,
        retryable: bool,
        retry_after: Optional[float] = None,
        quiet: bool = False,
    ) -> dict[str, Any]:
        if not quiet:
            fields = self._fields(event)
            fields.update(error=type(error).__name__, message=str(error), retryable=retryable)
            log("warn", "step failed", fields)
        backtrace = traceback.format_exception(type(error), error, error.__traceback__)
        completion = {
            "event_id": event["event_id"],
            "task_uuid": event["task_uuid"],
            "step_uuid": event["step_uuid"],
            "success": False,
            "retryable": retryable,
            "error_class": type(error).__name__,
            "error_message": str(error),
            "metadata": {"backtrace": [line.rstrip() for line in backtrace[-10:]]},
        }
        if retry_after is not None:
            completion["retry_after"] = retry_after
        return completion

    # -- interrupter ------------------------------------------------------------------------------

    def _interrupts(self) -> None:
        while True:
            try:
                interrupt = _tasker_core._next_step_interrupt(None)
            except Exception as error:
                logger.error("interrupter error; going on", exc_info=error)
                continue
            if interrupt is None:
                return
            if interrupt is False:
                if self._stopped:
                    return
                continue
            exception = StepCancelledError if interrupt["reason"] == "cancelled" else StepTimeoutError
            for slot in self._slots:
                with slot.lock:
                    if slot.event_id == interrupt["event_id"]:
                        _raise_in(slot.thread_id, exception)
