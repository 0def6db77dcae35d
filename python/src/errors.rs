//! The exception classes and the mapping from engine errors to them.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tasker_worker::EngineError;

create_exception!(
    tasker_core,
    TaskerError,
    PyException,
    "Base class of every tasker_core error."
);
create_exception!(
    tasker_core,
    WorkerNotInitializedError,
    TaskerError,
    "A call that needs a running worker was made without one (or the worker is shutting down)."
);
create_exception!(
    tasker_core,
    WorkerBootstrapError,
    TaskerError,
    "The worker could not start, or one is already running."
);
create_exception!(
    tasker_core,
    ConfigurationError,
    TaskerError,
    "A bad configuration or template; the message names the key (or file and step)."
);
create_exception!(
    tasker_core,
    FFIError,
    TaskerError,
    "An internal failure in the native extension (a caught panic, a backend failure)."
);
create_exception!(
    tasker_core,
    TaskNotFoundError,
    TaskerError,
    "A task uuid the worker does not know."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("TaskerError", py.get_type::<TaskerError>())?;
    m.add(
        "WorkerNotInitializedError",
        py.get_type::<WorkerNotInitializedError>(),
    )?;
    m.add(
        "WorkerBootstrapError",
        py.get_type::<WorkerBootstrapError>(),
    )?;
    m.add("ConfigurationError", py.get_type::<ConfigurationError>())?;
    m.add("FFIError", py.get_type::<FFIError>())?;
    m.add("TaskNotFoundError", py.get_type::<TaskNotFoundError>())?;
    Ok(())
}

/// Engine error → the matching Python class.
pub fn engine(e: EngineError) -> PyErr {
    match e {
        EngineError::Configuration(m) => ConfigurationError::new_err(m),
        EngineError::Bootstrap(m) => WorkerBootstrapError::new_err(m),
        e @ EngineError::StartFailed { .. } => WorkerBootstrapError::new_err(e.to_string()),
        EngineError::NotInitialized => not_initialized(),
        e @ EngineError::ShuttingDown => WorkerNotInitializedError::new_err(e.to_string()),
        EngineError::InvalidArgument(m) => PyValueError::new_err(m),
        e @ EngineError::UnknownTask(_) => TaskNotFoundError::new_err(e.to_string()),
        EngineError::Internal(m) => FFIError::new_err(m),
        e @ EngineError::Backend { .. } => FFIError::new_err(e.to_string()),
    }
}

pub fn not_initialized() -> PyErr {
    WorkerNotInitializedError::new_err(
        "worker not initialized: call tasker_core.ffi.bootstrap_worker (or Worker.start) first",
    )
}

pub fn type_error(message: impl Into<String>) -> PyErr {
    PyTypeError::new_err(message.into())
}

pub fn value_error(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}

/// Run an FFI body; a panic becomes `FFIError` instead of unwinding toward Python (PyO3 would
/// raise its `PanicException`, a `BaseException` that handlers' `except Exception` would miss).
pub fn guard<T>(body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(panic) => {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".to_string());
            tracing::error!(%detail, "internal panic caught at the FFI boundary");
            Err(FFIError::new_err(format!(
                "internal error in tasker_core (a Rust panic was caught): {detail}"
            )))
        }
    }
}
