"""The seed plan's unit tests, as written (TAS-72-P2)."""

import pytest

from tasker_core.errors import WorkerBootstrapError, WorkerNotInitializedError
from tasker_core.ffi import bootstrap_worker, stop_worker
from tasker_core.models import BootstrapConfig


def test_bootstrap_with_defaults():
    """Test bootstrap with default configuration."""
    config = BootstrapConfig()
    result = bootstrap_worker(config)
    assert result.success
    assert result.worker_id
    stop_worker()


def test_bootstrap_with_custom_namespace():
    """Test bootstrap with custom namespace."""
    config = BootstrapConfig(namespace="test-namespace")
    result = bootstrap_worker(config)
    assert result.success
    stop_worker()


def test_double_bootstrap_fails():
    """Test that bootstrapping twice raises error."""
    config = BootstrapConfig()
    bootstrap_worker(config)
    with pytest.raises(WorkerBootstrapError):
        bootstrap_worker(config)
    stop_worker()


def test_stop_without_bootstrap():
    """Test that stopping without bootstrap raises error."""
    with pytest.raises(WorkerNotInitializedError):
        stop_worker()
