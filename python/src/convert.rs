//! Conversions between Python objects and engine data. Users' data (contexts, results) goes
//! through `pythonize`; the bridge's own dicts are built here with str keys.

use crate::errors;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value as Json};
use std::time::Duration;
use tasker_worker::events::{StepInterrupt, StepSnapshot, TaskSnapshot};
use tasker_worker::{StepExecutionCompletionEvent, StepExecutionEvent, WorkerSystemStatus};
use uuid::Uuid;

/// JSON → Python (dict, list, str, int, float, bool, None).
pub fn to_py<'py>(py: Python<'py>, json: &Json) -> PyResult<Bound<'py, PyAny>> {
    pythonize::pythonize(py, json).map_err(|e| errors::value_error(e.to_string()))
}

/// Nesting deeper than this is refused (a cycle, or data no step should carry).
const MAX_DEPTH: usize = 128;

/// Python → JSON, strictly: dict (str keys), list, tuple, str, int (64 bits), finite float, bool,
/// None. Anything else (a set, bytes, an object, NaN) is a `TypeError` naming `what` and the type,
/// never converted by a guess (pythonize would turn a set into a list).
pub fn from_py(value: &Bound<'_, PyAny>, what: &str) -> PyResult<Json> {
    to_json(value, what, 0)
}

fn not_jsonable(what: &str, problem: String) -> PyErr {
    errors::type_error(format!("{what}: not JSON-able: {problem}"))
}

fn to_json(value: &Bound<'_, PyAny>, what: &str, depth: usize) -> PyResult<Json> {
    if depth > MAX_DEPTH {
        return Err(not_jsonable(
            what,
            format!("nested more than {MAX_DEPTH} levels (a cycle?)"),
        ));
    }
    if value.is_none() {
        return Ok(Json::Null);
    }
    if let Ok(flag) = value.downcast::<PyBool>() {
        return Ok(Json::Bool(flag.is_true()));
    }
    if let Ok(int) = value.downcast::<PyInt>() {
        return match int.extract::<i64>() {
            Ok(n) => Ok(Json::from(n)),
            Err(_) => int
                .extract::<u64>()
                .map(Json::from)
                .map_err(|_| not_jsonable(what, format!("integer {int} does not fit in 64 bits"))),
        };
    }
    if let Ok(float) = value.downcast::<PyFloat>() {
        let f = float.value();
        return serde_json::Number::from_f64(f)
            .map(Json::Number)
            .ok_or_else(|| not_jsonable(what, format!("{f} is not a JSON number")));
    }
    if let Ok(text) = value.downcast::<PyString>() {
        return Ok(Json::String(text.to_cow()?.into_owned()));
    }
    if let Ok(dict) = value.downcast::<PyDict>() {
        let mut map = Map::new();
        for (key, item) in dict.iter() {
            let Ok(key) = key.downcast::<PyString>() else {
                return Err(not_jsonable(
                    what,
                    format!("dict keys must be str, got {}", key.get_type().name()?),
                ));
            };
            map.insert(key.to_cow()?.into_owned(), to_json(&item, what, depth + 1)?);
        }
        return Ok(Json::Object(map));
    }
    if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        let mut items = Vec::new();
        for item in value.try_iter()? {
            items.push(to_json(&item?, what, depth + 1)?);
        }
        return Ok(Json::Array(items));
    }
    Err(not_jsonable(
        what,
        format!(
            "a {} (use dict, list, tuple, str, int, float, bool or None)",
            value.get_type().name()?
        ),
    ))
}

/// A Python dict → a JSON object; `what` names it in errors.
pub fn object_from_py(value: &Bound<'_, PyAny>, what: &str) -> PyResult<Map<String, Json>> {
    if !value.is_instance_of::<PyDict>() {
        return Err(errors::type_error(format!(
            "{what} must be a dict, got {}",
            value.get_type().name()?
        )));
    }
    match from_py(value, what)? {
        Json::Object(map) => Ok(map),
        _ => Err(errors::type_error(format!("{what} must be a dict"))),
    }
}

pub fn uuid_str(id: Uuid) -> String {
    id.hyphenated().to_string()
}

pub fn parse_uuid(text: &str, what: &str) -> PyResult<Uuid> {
    Uuid::parse_str(text).map_err(|_| errors::value_error(format!("{what} {text:?} is not a UUID")))
}

/// A step execution event, with the same keys as the Ruby bridge's Hash.
pub fn event_to_py<'py>(
    py: Python<'py>,
    event: &StepExecutionEvent,
) -> PyResult<Bound<'py, PyDict>> {
    let task = &event.task;
    let definition = &event.definition;
    let task_uuid = uuid_str(task.task_uuid);
    let step_uuid = uuid_str(event.step_uuid);

    let task_dict = PyDict::new(py);
    task_dict.set_item("task_uuid", &task_uuid)?;
    task_dict.set_item("namespace", &*task.namespace)?;
    task_dict.set_item("name", &*task.name)?;
    task_dict.set_item("version", &*task.version)?;
    task_dict.set_item("context", to_py(py, &task.context)?)?;

    let retry = &definition.retry;
    let step = PyDict::new(py);
    step.set_item("step_uuid", &step_uuid)?;
    step.set_item("name", &*definition.name)?;
    step.set_item("attempts", event.attempt)?;
    step.set_item("max_attempts", retry.max_attempts)?;
    step.set_item("retryable", retry.retryable)?;

    let results = PyDict::new(py);
    for (name, result) in &event.dependency_results {
        results.set_item(&**name, to_py(py, result)?)?;
    }

    let handler = PyDict::new(py);
    handler.set_item("callable", &definition.callable)?;
    handler.set_item("initialization", to_py(py, &definition.initialization)?)?;
    let retry_dict = PyDict::new(py);
    retry_dict.set_item("retryable", retry.retryable)?;
    retry_dict.set_item("max_attempts", retry.max_attempts)?;
    retry_dict.set_item("backoff", retry.backoff.as_str())?;
    retry_dict.set_item("backoff_base_ms", retry.backoff_base_ms)?;
    retry_dict.set_item("max_backoff_ms", retry.max_backoff_ms)?;
    let step_definition = PyDict::new(py);
    step_definition.set_item("name", &*definition.name)?;
    step_definition.set_item("handler", handler)?;
    step_definition.set_item("dependencies", PyList::new(py, &definition.dependencies)?)?;
    step_definition.set_item("retry", retry_dict)?;
    step_definition.set_item("timeout_seconds", definition.timeout.as_secs_f64())?;
    step_definition.set_item("on_timeout", definition.on_timeout.as_str())?;

    let sequence = PyDict::new(py);
    sequence.set_item("task", task_dict)?;
    sequence.set_item("workflow_step", step)?;
    sequence.set_item("dependency_results", results)?;
    sequence.set_item("step_definition", step_definition)?;

    let dict = PyDict::new(py);
    dict.set_item("event_id", uuid_str(event.event_id))?;
    dict.set_item("task_uuid", task_uuid)?;
    dict.set_item("step_uuid", step_uuid)?;
    dict.set_item("task_sequence_step", sequence)?;
    dict.set_item("ready_at_ns", event.ready_at_ns)?;
    Ok(dict)
}

/// A completion dict (the keys of the Ruby bridge's completion Hash) → the engine's event.
/// Missing or ill-typed fields are a `ValueError`/`TypeError` naming the field.
pub fn completion_from_py(dict: &Bound<'_, PyDict>) -> PyResult<StepExecutionCompletionEvent> {
    let field = |key: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(dict.get_item(key)?.filter(|v| !v.is_none()))
    };
    let uuid = |key: &str| -> PyResult<Uuid> {
        let value = field(key)?
            .ok_or_else(|| errors::value_error(format!("completion: {key} is required")))?;
        let text: String = value
            .extract()
            .map_err(|_| errors::type_error(format!("completion: {key} must be a str")))?;
        parse_uuid(&text, &format!("completion: {key}"))
    };
    let text = |key: &str| -> PyResult<Option<String>> {
        field(key)?
            .map(|v| {
                v.extract::<String>()
                    .map_err(|_| errors::type_error(format!("completion: {key} must be a str")))
            })
            .transpose()
    };
    let flag = |key: &str| -> PyResult<Option<bool>> {
        field(key)?
            .map(|v| {
                v.extract::<bool>()
                    .map_err(|_| errors::type_error(format!("completion: {key} must be a bool")))
            })
            .transpose()
    };
    let success =
        flag("success")?.ok_or_else(|| errors::value_error("completion: success is required"))?;
    let retry_after = match field("retry_after")? {
        None => None,
        Some(v) => {
            let seconds: f64 = v.extract().map_err(|_| {
                errors::type_error("completion: retry_after must be a number of seconds")
            })?;
            if seconds.is_nan() || seconds < 0.0 {
                return Err(errors::value_error(
                    "completion: retry_after must be a non-negative number of seconds (not NaN)",
                ));
            }
            Some(Duration::try_from_secs_f64(seconds).unwrap_or(tasker_worker::MAX_RETRY_AFTER))
        }
    };
    let result = match field("result")? {
        Some(v) => from_py(&v, "completion: result")?,
        None => Json::Null,
    };
    let metadata = match field("metadata")? {
        Some(v) => from_py(&v, "completion: metadata")?,
        None => Json::Object(Map::new()),
    };
    Ok(StepExecutionCompletionEvent {
        event_id: uuid("event_id")?,
        task_uuid: uuid("task_uuid")?,
        step_uuid: uuid("step_uuid")?,
        success,
        result,
        metadata,
        error_message: text("error_message")?,
        error_class: text("error_class")?,
        retryable: flag("retryable")?.unwrap_or(true),
        retry_after,
        completed_at: text("completed_at")?,
    })
}

pub fn status_to_py<'py>(
    py: Python<'py>,
    status: &WorkerSystemStatus,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("running", status.running)?;
    dict.set_item("state", status.state.as_str())?;
    dict.set_item("quiet", status.quiet)?;
    dict.set_item("worker_id", &status.worker_id)?;
    dict.set_item("environment", &status.environment)?;
    dict.set_item("backend", status.backend)?;
    dict.set_item("deployment_mode", status.deployment_mode)?;
    dict.set_item("concurrency", status.concurrency)?;
    dict.set_item("uptime_seconds", status.uptime_seconds)?;
    dict.set_item("steps_processed", status.steps_processed)?;
    dict.set_item("steps_failed", status.steps_failed)?;
    dict.set_item("steps_in_flight", status.steps_in_flight)?;
    dict.set_item("supported_namespaces", &status.supported_namespaces)?;
    dict.set_item("web_api_enabled", status.web_api_enabled)?;
    dict.set_item(
        "web_api_bind",
        status.web_api_bind.map(|address| address.to_string()),
    )?;
    dict.set_item("database_pool_size", status.database_pool_size)?;
    dict.set_item("database_pool_idle", status.database_pool_idle)?;
    Ok(dict)
}

/// ns since the Unix epoch → ISO 8601 UTC with milliseconds.
fn iso8601(ns: Option<u64>) -> Option<String> {
    ns.map(|ns| {
        let at = std::time::UNIX_EPOCH + Duration::from_nanos(ns);
        humantime::format_rfc3339_millis(at).to_string()
    })
}

pub fn snapshot_to_py<'py>(
    py: Python<'py>,
    snapshot: &TaskSnapshot,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("task_uuid", uuid_str(snapshot.task_uuid))?;
    dict.set_item("namespace", &snapshot.namespace)?;
    dict.set_item("name", &snapshot.name)?;
    dict.set_item("version", &snapshot.version)?;
    dict.set_item("status", snapshot.status.as_str())?;
    dict.set_item("created_at", iso8601(snapshot.created_at_ns))?;
    dict.set_item("completed_at", iso8601(snapshot.completed_at_ns))?;
    let steps = PyList::empty(py);
    for step in &snapshot.steps {
        steps.append(step_to_py(py, step)?)?;
    }
    dict.set_item("steps", steps)?;
    dict.set_item("steps_retained", snapshot.steps_retained)?;
    Ok(dict)
}

fn step_to_py<'py>(py: Python<'py>, step: &StepSnapshot) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("step_uuid", uuid_str(step.step_uuid))?;
    dict.set_item("name", &step.name)?;
    dict.set_item("status", step.status.as_str())?;
    dict.set_item("attempts", step.attempts)?;
    match &step.result {
        Some(result) => dict.set_item("result", to_py(py, result)?)?,
        None => dict.set_item("result", py.None())?,
    }
    match &step.metadata {
        Some(metadata) => dict.set_item("metadata", to_py(py, metadata)?)?,
        None => dict.set_item("metadata", PyDict::new(py))?,
    }
    dict.set_item("error_message", step.error_message.as_deref())?;
    dict.set_item("started_at", iso8601(step.started_at_ns))?;
    dict.set_item("completed_at", iso8601(step.completed_at_ns))?;
    let duration_ms = match (step.started_at_ns, step.completed_at_ns) {
        (Some(start), Some(end)) => Some(end.saturating_sub(start) as f64 / 1e6),
        _ => None,
    };
    dict.set_item("duration_ms", duration_ms)?;
    Ok(dict)
}

pub fn interrupt_to_py<'py>(
    py: Python<'py>,
    interrupt: &StepInterrupt,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("event_id", uuid_str(interrupt.event_id))?;
    dict.set_item("task_uuid", uuid_str(interrupt.task_uuid))?;
    dict.set_item("step_uuid", uuid_str(interrupt.step_uuid))?;
    dict.set_item("step_name", &*interrupt.step_name)?;
    dict.set_item("attempt", interrupt.attempt)?;
    dict.set_item("timeout_seconds", interrupt.timeout.as_secs_f64())?;
    dict.set_item("reason", interrupt.reason.as_str())?;
    Ok(dict)
}

/// Python's rule for `handler.callable`: a dotted path to a class, at least `module.ClassName`
/// (each part an identifier).
pub fn python_dotted_path(callable: &str) -> Result<(), String> {
    let parts: Vec<&str> = callable.split('.').collect();
    let identifier = |part: &str| {
        let mut chars = part.chars();
        matches!(chars.next(), Some(c) if c == '_' || c.is_alphabetic())
            && chars.all(|c| c == '_' || c.is_alphanumeric())
    };
    if parts.len() >= 2 && parts.iter().all(|p| identifier(p)) {
        Ok(())
    } else {
        Err(
            "is not a Python class path (expected e.g. \"fulfillment.handlers.ValidateOrder\")"
                .into(),
        )
    }
}
