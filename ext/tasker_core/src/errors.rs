//! The contract's error classes, defined here so they exist as soon as the extension loads,
//! and the mapping from engine errors to them.

use magnus::{exception::ExceptionClass, prelude::*, value::Lazy, Error, RModule, Ruby};
use std::cell::{Cell, RefCell};
use tasker_worker::EngineError;

fn tasker_error(ruby: &Ruby, name: &str) -> ExceptionClass {
    let module: RModule = ruby
        .class_object()
        .const_get("TaskerCore")
        .expect("TaskerCore is defined at init");
    module
        .const_get(name)
        .expect("error classes are defined at init")
}

static WORKER_NOT_INITIALIZED: Lazy<ExceptionClass> =
    Lazy::new(|ruby| tasker_error(ruby, "WorkerNotInitializedError"));
static WORKER_BOOTSTRAP: Lazy<ExceptionClass> =
    Lazy::new(|ruby| tasker_error(ruby, "WorkerBootstrapError"));
static CONFIGURATION: Lazy<ExceptionClass> =
    Lazy::new(|ruby| tasker_error(ruby, "ConfigurationError"));
static FFI: Lazy<ExceptionClass> = Lazy::new(|ruby| tasker_error(ruby, "FFIError"));
static TASK_NOT_FOUND: Lazy<ExceptionClass> =
    Lazy::new(|ruby| tasker_error(ruby, "TaskNotFoundError"));

pub fn define(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let base = module.define_error("Error", ruby.exception_standard_error())?;
    for name in [
        "WorkerNotInitializedError",
        "WorkerBootstrapError",
        "ConfigurationError",
        "FFIError",
        "RetryableError",
        "PermanentError",
    ] {
        module.define_error(name, base)?;
    }
    // A task uuid never created (or no longer known) is one kind of failed FFI call.
    let ffi_error: ExceptionClass = module.const_get("FFIError")?;
    module.define_error("TaskNotFoundError", ffi_error)?;
    // Raised inside a handler whose attempt ran past the step's timeout_seconds.
    module.define_error("StepTimeoutError", base)?;
    // Resolve now, on the loading thread, so later lookups cannot fail.
    for class in [
        &WORKER_NOT_INITIALIZED,
        &WORKER_BOOTSTRAP,
        &CONFIGURATION,
        &FFI,
        &TASK_NOT_FOUND,
    ] {
        Lazy::force(class, ruby);
    }
    Ok(())
}

pub fn not_initialized(ruby: &Ruby, message: impl Into<String>) -> Error {
    Error::new(ruby.get_inner(&WORKER_NOT_INITIALIZED), message.into())
}

pub fn bootstrap(ruby: &Ruby, message: impl Into<String>) -> Error {
    Error::new(ruby.get_inner(&WORKER_BOOTSTRAP), message.into())
}

pub fn configuration(ruby: &Ruby, message: impl Into<String>) -> Error {
    Error::new(ruby.get_inner(&CONFIGURATION), message.into())
}

/// The same problem as a `ConfigurationError` (a conversion's `ArgumentError` about a task's
/// context is a configuration problem of the request). Interrupts and Ruby exceptions pass as is.
pub fn as_configuration(ruby: &Ruby, e: Error) -> Error {
    match e.error_type() {
        magnus::error::ErrorType::Error(_, message) => configuration(ruby, message.to_string()),
        _ => e,
    }
}

pub fn ffi(ruby: &Ruby, message: impl Into<String>) -> Error {
    Error::new(ruby.get_inner(&FFI), message.into())
}

/// `TaskerCore::TaskNotFoundError` (an `FFIError`): no task with that uuid was ever created here, or
/// it is no longer known.
pub fn task_not_found(ruby: &Ruby, message: impl Into<String>) -> Error {
    Error::new(ruby.get_inner(&TASK_NOT_FOUND), message.into())
}

pub fn argument(ruby: &Ruby, message: impl Into<String>) -> Error {
    Error::new(ruby.exception_arg_error(), message.into())
}

/// Engine error → the contract's Ruby class.
pub fn engine(ruby: &Ruby, e: EngineError) -> Error {
    let message = e.to_string();
    match e {
        EngineError::Configuration(_) => configuration(ruby, message),
        EngineError::Bootstrap(_) | EngineError::StartFailed { .. } => bootstrap(ruby, message),
        EngineError::NotInitialized => not_initialized(
            ruby,
            "worker not initialized: call TaskerCore::FFI.bootstrap_worker (or Worker::Bootstrap.start!) first",
        ),
        EngineError::ShuttingDown => not_initialized(ruby, message),
        EngineError::InvalidArgument(_) => argument(ruby, message),
        EngineError::UnknownTask(_) => task_not_found(ruby, message),
        EngineError::Internal(_) | EngineError::Backend { .. } => ffi(ruby, message),
    }
}

thread_local! {
    /// How many `guard`s this thread is inside: their panics are caught and reported by us.
    static GUARDED: Cell<u32> = const { Cell::new(0) };
    /// Where the last panic inside a `guard` happened, for `panic_error` to report.
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Panics inside a `guard` are caught and logged by `panic_error` (without the GVL); the default
/// hook would print them to stderr on the spot, with the GVL held. Any other panic goes to the hook
/// that was installed before (the host's, or the default one).
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if GUARDED.with(Cell::get) > 0 {
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
            PANIC_LOCATION.with(|slot| *slot.borrow_mut() = location);
        } else {
            previous(info);
        }
    }));
}

/// A caught panic → `TaskerCore::FFIError` (never unwinds into Ruby).
pub fn panic_error(ruby: &Ruby, panic: Box<dyn std::any::Any + Send>) -> Error {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_string());
    let logged = detail.clone();
    let location = PANIC_LOCATION
        .with(|slot| slot.borrow_mut().take())
        .unwrap_or_else(|| "unknown".into());
    crate::gvl::log_without_gvl(
        ruby,
        move || tracing::error!(detail = %logged, %location, "internal panic caught at the FFI boundary"),
    );
    ffi(
        ruby,
        format!("internal error in tasker_core (a Rust panic was caught): {detail}"),
    )
}

/// Run an FFI body, turning a panic into `FFIError` before magnus would turn it into `fatal`.
pub fn guard<T>(ruby: &Ruby, body: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    GUARDED.with(|g| g.set(g.get() + 1));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    GUARDED.with(|g| g.set(g.get() - 1));
    match outcome {
        Ok(result) => result,
        Err(panic) => Err(panic_error(ruby, panic)),
    }
}
