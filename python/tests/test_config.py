"""BootstrapConfig: the Ruby config's keys, validated by pydantic and then by the engine."""

from __future__ import annotations

import pydantic
import pytest

import tasker_core
from tasker_core import BootstrapConfig, ConfigurationError, WorkerState
from tasker_core.ffi import bootstrap_worker, stop_worker, worker_status


def test_unknown_keys_are_refused():
    with pytest.raises(pydantic.ValidationError, match="concurency"):
        BootstrapConfig(concurency=2)  # type: ignore[call-arg]


def test_pydantic_checks_values():
    with pytest.raises(pydantic.ValidationError, match="log_level"):
        BootstrapConfig(log_level="loud")
    with pytest.raises(pydantic.ValidationError, match="concurrency"):
        BootstrapConfig(concurrency=0)
    with pytest.raises(pydantic.ValidationError, match="backend"):
        BootstrapConfig(backend="redis")


def test_the_engine_names_a_bad_key(templates):
    with pytest.raises(ConfigurationError, match="poll_interval"):
        bootstrap_worker(BootstrapConfig(templates=[templates], poll_interval=-1))
    with pytest.raises(ConfigurationError, match="namespace"):
        bootstrap_worker(BootstrapConfig(templates=[templates], namespaces=["nobody"]))
    assert worker_status().state == WorkerState.STOPPED


def test_a_ruby_callable_is_not_a_python_class_path(tmp_path):
    (tmp_path / "t.yaml").write_text(
        "namespace: n\nname: t\nversion: 1\nsteps:\n"
        "  - { name: a, handler: { callable: Fulfillment::Ship } }\n"
    )
    expected = r"step `a`: handler.callable .* is not a Python class path"
    with pytest.raises(ConfigurationError, match=expected):
        bootstrap_worker(BootstrapConfig(templates=[str(tmp_path)]))


def test_config_path_is_read_and_fields_win(tmp_path, templates):
    path = tmp_path / "worker.yaml"
    path.write_text(f"concurrency: 3\nworker_id: from-file\ntemplates: [{templates}]\nenvironment: staging\n")
    result = bootstrap_worker(BootstrapConfig(config_path=str(path), worker_id="from-field"))
    try:
        status = worker_status()
        assert result.worker_id == "from-field"
        assert (status.concurrency, status.environment) == (3, "staging")
    finally:
        stop_worker()
    with pytest.raises(ConfigurationError, match="config_path: cannot read"):
        bootstrap_worker(BootstrapConfig(config_path=str(tmp_path / "missing.yaml")))


def test_status_through_the_lifecycle(templates):
    assert worker_status().state == WorkerState.STOPPED
    result = bootstrap_worker(BootstrapConfig(templates=[templates], concurrency=2, worker_id="py-1"))
    assert (result.worker_id, result.status, result.concurrency) == ("py-1", "running", 2)
    status = worker_status()
    assert status.state == WorkerState.RUNNING and status.running
    assert status.handle_id == result.handle_id
    assert "python_demo" in status.supported_namespaces
    assert tasker_core.ffi.transition_to_graceful_shutdown()
    assert worker_status().state == WorkerState.SHUTTING_DOWN
    with pytest.raises(tasker_core.WorkerNotInitializedError, match="shutting down"):
        tasker_core.create_task("python_demo", "diamond")
    assert stop_worker()
    assert worker_status().state == WorkerState.STOPPED
    last = tasker_core.ffi.last_stopped_status()
    assert last is not None and last.worker_id == "py-1"


def test_errors_form_one_hierarchy():
    for cls in (
        tasker_core.WorkerNotInitializedError,
        tasker_core.WorkerBootstrapError,
        tasker_core.ConfigurationError,
        tasker_core.FFIError,
        tasker_core.RetryableError,
        tasker_core.PermanentError,
        tasker_core.TaskNotFoundError,
    ):
        assert issubclass(cls, tasker_core.TaskerError)
    assert tasker_core.RetryableError("x", retry_after=2).retry_after == 2
