//! The engine's log lines, carried to Python's `logging`.
//!
//! The bridge installs the process-wide tracing subscriber (the engine installs none by itself):
//! each event becomes a record on a bounded queue. A Python thread (started by the package) takes
//! the records with the GIL released and hands them to the `tasker_core` logger, so no Rust
//! thread ever calls Python. A full queue drops the record and counts it (blocking would stall
//! the engine behind a slow Python thread).

use crate::errors::guard;
use crate::wait::{self, Slice, Waited};
use crossbeam_channel::{Receiver, Sender};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use serde_json::{Map, Value as Json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use tasker_worker::logging::to_filter;
use tasker_worker::LogLevel;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::Context;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, Layer, Registry};

/// Records queued for the Python thread before new ones are dropped.
const QUEUED_RECORDS: usize = 65_536;
/// Records handed to Python per call.
const BATCH: usize = 512;

struct Record {
    level: &'static str,
    target: String,
    message: String,
    fields: Map<String, Json>,
    time_ns: u64,
}

struct Installed {
    queue: Receiver<Record>,
    level: reload::Handle<LevelFilter, Registry>,
}

static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

struct ToQueue(Sender<Record>);

impl<S: Subscriber> Layer<S> for ToQueue {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        let metadata = event.metadata();
        let record = Record {
            level: match *metadata.level() {
                tracing::Level::TRACE => "trace",
                tracing::Level::DEBUG => "debug",
                tracing::Level::INFO => "info",
                tracing::Level::WARN => "warn",
                tracing::Level::ERROR => "error",
            },
            target: metadata.target().to_string(),
            message: visitor.message,
            fields: visitor.fields,
            time_ns: tasker_worker::events::unix_ns(),
        };
        if self.0.try_send(record).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Map<String, Json>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.insert(field.name().into(), Json::from(value));
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.fields.insert(field.name().into(), Json::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields.insert(field.name().into(), Json::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.insert(field.name().into(), Json::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.fields.insert(field.name().into(), Json::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields
                .insert(field.name().into(), Json::from(format!("{value:?}")));
        }
    }
}

/// Install the subscriber once; the initial level comes from `TASKER_LOG_LEVEL` (default info).
/// If the process already has a global subscriber, the engine's lines go there instead.
fn installed() -> Option<&'static Installed> {
    INSTALLED
        .get_or_init(|| {
            let level = std::env::var("TASKER_LOG_LEVEL")
                .ok()
                .and_then(|v| LogLevel::parse(v.trim()))
                .unwrap_or(LogLevel::Info);
            let (filter, handle) = reload::Layer::new(to_filter(level));
            let (sender, queue) = crossbeam_channel::bounded(QUEUED_RECORDS);
            let subscriber = Registry::default().with(filter).with(ToQueue(sender));
            tracing::subscriber::set_global_default(subscriber).ok()?;
            Some(Installed {
                queue,
                level: handle,
            })
        })
        .as_ref()
}

pub fn set_level(level: LogLevel) {
    if let Some(installed) = installed() {
        let _ = installed.level.modify(|filter| *filter = to_filter(level));
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    installed();
    m.add_function(wrap_pyfunction!(_next_log_records, m)?)?;
    m.add_function(wrap_pyfunction!(_set_log_level, m)?)?;
    m.add_function(wrap_pyfunction!(_dropped_log_records, m)?)?;
    m.add_function(wrap_pyfunction!(_emit_test_log, m)?)?;
    Ok(())
}

/// `_next_log_records(timeout=None) -> list[tuple] | None`: the engine's queued records as
/// `(level, target, message, fields, time_ns)`, waiting (GIL released) up to `timeout` for the
/// first; an empty list on timeout or wake; None if the engine's lines do not come here.
#[pyfunction]
#[pyo3(signature = (timeout=None))]
fn _next_log_records(py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Bound<'_, PyList>>> {
    guard(|| {
        let Some(installed) = installed() else {
            return Ok(None);
        };
        let timeout = wait::timeout(timeout, "timeout")?;
        let queue = &installed.queue;
        let mut batch = Vec::new();
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        if batch.is_empty() && timeout != Some(std::time::Duration::ZERO) {
            let waited = wait::wait(py, timeout, true, |wake, limit| {
                let mut select = crossbeam_channel::Select::new();
                let records = select.recv(queue);
                select.recv(wake);
                let op = match limit {
                    Some(l) => match select.select_timeout(l) {
                        Ok(op) => op,
                        Err(_) => return Slice::TimedOut,
                    },
                    None => select.select(),
                };
                if op.index() == records {
                    match op.recv(queue) {
                        Ok(record) => Slice::Done(record),
                        Err(_) => Slice::Woken,
                    }
                } else {
                    let _ = op.recv(wake);
                    Slice::Woken
                }
            })?;
            if let Waited::Done(record) = waited {
                batch.push(record);
            }
        }
        let list = PyList::empty(py);
        for record in batch {
            let fields = match pythonize::pythonize(py, &Json::Object(record.fields)) {
                Ok(fields) => fields,
                Err(_) => PyDict::new(py).into_any(),
            };
            let tuple = PyTuple::new(
                py,
                [
                    record.level.into_pyobject(py)?.into_any(),
                    record.target.into_pyobject(py)?.into_any(),
                    record.message.into_pyobject(py)?.into_any(),
                    fields,
                    record.time_ns.into_pyobject(py)?.into_any(),
                ],
            )?;
            list.append(tuple)?;
        }
        Ok(Some(list))
    })
}

/// `_set_log_level(level)`: the level of the engine's lines (trace, debug, info, warn, error).
#[pyfunction]
fn _set_log_level(level: &str) -> PyResult<()> {
    guard(|| {
        let parsed = LogLevel::parse(level).ok_or_else(|| {
            crate::errors::ConfigurationError::new_err(format!(
                "log_level: {level:?} is not one of trace, debug, info, warn or error"
            ))
        })?;
        set_level(parsed);
        Ok(())
    })
}

/// Records dropped because the queue was full, since the process started.
#[pyfunction]
fn _dropped_log_records() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// `_emit_test_log(level, message, fields)`: log a line from Rust, as the engine would (for the
/// tests of the relay).
#[pyfunction]
fn _emit_test_log(level: &str, message: &str, detail: &str) -> PyResult<()> {
    guard(|| {
        let message = message.to_string();
        let detail = detail.to_string();
        let level = level.to_string();
        // From a Rust thread of its own, like the engine's lines.
        std::thread::spawn(move || match level.as_str() {
            "error" => tracing::error!(detail = %detail, "{message}"),
            "warn" => tracing::warn!(detail = %detail, "{message}"),
            "debug" => tracing::debug!(detail = %detail, "{message}"),
            "trace" => tracing::trace!(detail = %detail, "{message}"),
            _ => tracing::info!(detail = %detail, "{message}"),
        })
        .join()
        .map_err(|_| crate::errors::FFIError::new_err("the logging thread panicked"))
    })
}
