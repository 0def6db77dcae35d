//! Conversions between Ruby values and engine data, written by hand with cached symbol keys:
//! serde_magnus allocates a temporary String per key, and these run once per step.

use crate::errors;
use magnus::{
    prelude::*,
    r_hash::ForEach,
    rb_sys::{AsRawValue, FromRawValue},
    value::LazyId,
    Error, Float, Integer, IntoValue, RArray, RHash, RString, Ruby, Symbol, Value,
};
use serde_json::{Map, Number, Value as Json};
use std::time::Duration;
use tasker_worker::events::{StepInterrupt, StepSnapshot, TaskSnapshot};
use tasker_worker::template::StepDefinition;
use tasker_worker::{
    StepExecutionCompletionEvent, StepExecutionEvent, WorkerSystemStatus, MAX_RETRY_AFTER,
};
use uuid::Uuid;

/// A symbol key, interned once, that also knows its name (for string-key lookups and messages).
pub struct Key {
    id: LazyId,
    pub name: &'static str,
}

impl std::ops::Deref for Key {
    type Target = magnus::value::OpaqueId;
    fn deref(&self) -> &Self::Target {
        std::ops::Deref::deref(&self.id)
    }
}

macro_rules! keys {
    ($($name:ident = $text:literal),* $(,)?) => { $(pub static $name: Key = Key { id: LazyId::new($text), name: $text };)* };
}

/// `Ruby#hash_new_capa` needs Ruby 3.2; this keeps call sites honest about sizes anyway.
trait HashNew {
    fn hash_new_capa_(&self, capacity: usize) -> RHash;
}

impl HashNew for Ruby {
    fn hash_new_capa_(&self, _capacity: usize) -> RHash {
        self.hash_new()
    }
}

keys! {
    EVENT_ID = "event_id", TASK_UUID = "task_uuid", STEP_UUID = "step_uuid",
    TASK_SEQUENCE_STEP = "task_sequence_step", TASK = "task", NAMESPACE = "namespace", NAME = "name",
    VERSION = "version", CONTEXT = "context", WORKFLOW_STEP = "workflow_step", ATTEMPTS = "attempts",
    MAX_ATTEMPTS = "max_attempts", RETRYABLE = "retryable", DEPENDENCY_RESULTS = "dependency_results",
    STEP_DEFINITION = "step_definition", HANDLER = "handler", CALLABLE = "callable",
    INITIALIZATION = "initialization", DEPENDENCIES = "dependencies", RETRY = "retry", BACKOFF = "backoff",
    BACKOFF_BASE_MS = "backoff_base_ms", MAX_BACKOFF_MS = "max_backoff_ms", TIMEOUT_SECONDS = "timeout_seconds",
    SUCCESS = "success", RESULT = "result", METADATA = "metadata", ERROR_MESSAGE = "error_message",
    ERROR_CLASS = "error_class", RETRY_AFTER = "retry_after", COMPLETED_AT = "completed_at",
    STATUS = "status", STEPS = "steps", RUNNING = "running", STATE = "state", WORKER_ID = "worker_id",
    ENVIRONMENT = "environment", BACKEND = "backend", DEPLOYMENT_MODE = "deployment_mode",
    CONCURRENCY = "concurrency", UPTIME_SECONDS = "uptime_seconds", STEPS_PROCESSED = "steps_processed",
    STEPS_FAILED = "steps_failed", STEPS_IN_FLIGHT = "steps_in_flight",
    SUPPORTED_NAMESPACES = "supported_namespaces", WEB_API_ENABLED = "web_api_enabled",
    WEB_API_BIND = "web_api_bind",
    DATABASE_POOL_SIZE = "database_pool_size", DATABASE_POOL_IDLE = "database_pool_idle",
    READY_AT_NS = "ready_at_ns", CONTEXTS = "contexts", ON_TIMEOUT = "on_timeout",
    STARTED_AT = "started_at", DURATION_MS = "duration_ms", CREATED_AT = "created_at",
    STEPS_RETAINED = "steps_retained", REASON = "reason", STEP_NAME = "step_name", ATTEMPT = "attempt",
    QUIET = "quiet", RUN_AT = "run_at",
}

const MAX_DEPTH: usize = 128;

pub fn uuid_str(ruby: &Ruby, id: Uuid) -> RString {
    let mut buf = Uuid::encode_buffer();
    ruby.str_new(id.hyphenated().encode_lower(&mut buf))
}

/// JSON → Ruby, object keys as Strings (users' data keeps JSON's string keys).
pub fn json_to_ruby(ruby: &Ruby, json: &Json) -> Result<Value, Error> {
    Ok(match json {
        Json::Null => ruby.qnil().as_value(),
        Json::Bool(true) => ruby.qtrue().as_value(),
        Json::Bool(false) => ruby.qfalse().as_value(),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ruby.integer_from_i64(i).as_value()
            } else if let Some(u) = n.as_u64() {
                ruby.integer_from_u64(u).as_value()
            } else {
                ruby.float_from_f64(n.as_f64().unwrap_or(f64::NAN))
                    .as_value()
            }
        }
        Json::String(s) => ruby.str_new(s).as_value(),
        Json::Array(items) => {
            let array = ruby.ary_new_capa(items.len());
            for item in items {
                array.push(json_to_ruby(ruby, item)?)?;
            }
            array.as_value()
        }
        Json::Object(map) => {
            let hash = ruby.hash_new_capa_(map.len());
            for (k, v) in map {
                hash.aset(ruby.str_new(k), json_to_ruby(ruby, v)?)?;
            }
            hash.as_value()
        }
    })
}

/// Ruby → JSON. Hash keys may be Strings or Symbols; anything not JSON-able is an error
/// naming `what` and the offending class.
pub fn ruby_to_json(ruby: &Ruby, value: Value, what: &str) -> Result<Json, Error> {
    to_json(ruby, value, what, 0)
}

fn to_json(ruby: &Ruby, value: Value, what: &str, depth: usize) -> Result<Json, Error> {
    if depth > MAX_DEPTH {
        return Err(errors::argument(
            ruby,
            format!("{what}: nested more than {MAX_DEPTH} levels (a cycle?)"),
        ));
    }
    if value.is_nil() {
        return Ok(Json::Null);
    }
    if value.is_kind_of(ruby.class_true_class()) {
        return Ok(Json::Bool(true));
    }
    if value.is_kind_of(ruby.class_false_class()) {
        return Ok(Json::Bool(false));
    }
    if let Some(s) = RString::from_value(value) {
        return Ok(Json::String(string(ruby, s, what)?));
    }
    if let Some(sym) = Symbol::from_value(value) {
        return symbol_name(ruby, sym, what).map(Json::String);
    }
    if let Some(i) = Integer::from_value(value) {
        return match i.to_i64() {
            Ok(n) => Ok(Json::from(n)),
            Err(_) => i.to_u64().map(Json::from).map_err(|_| {
                errors::argument(ruby, format!("{what}: integer {i} does not fit in 64 bits"))
            }),
        };
    }
    if let Some(f) = Float::from_value(value) {
        return Number::from_f64(f.to_f64())
            .map(Json::Number)
            .ok_or_else(|| {
                errors::argument(ruby, format!("{what}: {} is not a JSON number", f.to_f64()))
            });
    }
    if let Some(array) = RArray::from_value(value) {
        let mut items = Vec::with_capacity(array.len());
        for item in array.into_iter() {
            items.push(to_json(ruby, item, what, depth + 1)?);
        }
        return Ok(Json::Array(items));
    }
    if let Some(hash) = RHash::from_value(value) {
        let mut map = Map::new();
        let mut failure = None;
        hash.foreach(|k: Value, v: Value| {
            let key = match key_string(ruby, k, what) {
                Ok(key) => key,
                Err(e) => {
                    failure = Some(e);
                    return Ok(ForEach::Stop);
                }
            };
            match to_json(ruby, v, what, depth + 1) {
                Ok(json) => {
                    map.insert(key, json);
                    Ok(ForEach::Continue)
                }
                Err(e) => {
                    failure = Some(e);
                    Ok(ForEach::Stop)
                }
            }
        })?;
        return match failure {
            Some(e) => Err(e),
            None => Ok(Json::Object(map)),
        };
    }
    Err(errors::argument(
        ruby,
        format!("{what}: a {} is not JSON-able (use Hash, Array, String, Symbol, Integer, Float, true, false or nil)", unsafe { value.classname() }),
    ))
}

fn key_string(ruby: &Ruby, key: Value, what: &str) -> Result<String, Error> {
    if let Some(s) = RString::from_value(key) {
        return string(ruby, s, what);
    }
    if let Some(sym) = Symbol::from_value(key) {
        return symbol_name(ruby, sym, what);
    }
    Err(errors::argument(
        ruby,
        format!(
            "{what}: hash keys must be Strings or Symbols, got a {}",
            unsafe { key.classname() }
        ),
    ))
}

/// A number of seconds from Ruby (Integer of any size, Float, Rational...), at most `max`: larger
/// ones, `Float::INFINITY` included, are `max`. NaN, negatives and non-numbers are an
/// `ArgumentError` naming `what`.
pub fn seconds_at_most(
    ruby: &Ruby,
    value: Value,
    what: &str,
    max: Duration,
) -> Result<Duration, Error> {
    let invalid = || {
        errors::argument(
            ruby,
            format!("{what} must be a non-negative number of seconds (not NaN)"),
        )
    };
    if !value.is_kind_of(ruby.class_numeric()) {
        return Err(invalid());
    }
    let seconds: f64 = value.funcall("to_f", ())?;
    if seconds.is_nan() || seconds < 0.0 {
        return Err(invalid());
    }
    Ok(Duration::try_from_secs_f64(seconds).unwrap_or(max).min(max))
}

/// A Symbol's name; one that is not valid UTF-8 (e.g. binary-encoded) is an `ArgumentError` like
/// such a String, not Ruby's `EncodingError`, so that the caller's completion is refused cleanly.
fn symbol_name(ruby: &Ruby, sym: Symbol, what: &str) -> Result<String, Error> {
    sym.name()
        .map(|name| name.into_owned())
        .map_err(|_| errors::argument(ruby, format!("{what}: symbol is not valid UTF-8")))
}

fn string(ruby: &Ruby, s: RString, what: &str) -> Result<String, Error> {
    s.to_string()
        .map_err(|_| errors::argument(ruby, format!("{what}: string is not valid UTF-8")))
}

/// A value under a Symbol key, or else under the String key (hashes from Ruby may use either).
pub fn fetch(ruby: &Ruby, hash: RHash, key: &Key) -> Option<Value> {
    hash.get(**key)
        .or_else(|| hash.get(ruby.str_new(key.name)))
        .filter(|v| !v.is_nil())
}

/// The config Hash → a JSON map keyed by strings.
pub fn config_map(ruby: &Ruby, config: Value) -> Result<Map<String, Json>, Error> {
    if config.is_nil() {
        return Ok(Map::new());
    }
    let Some(hash) = RHash::from_value(config) else {
        return Err(errors::configuration(
            ruby,
            format!("config must be a Hash, got a {}", unsafe {
                config.classname()
            }),
        ));
    };
    // `concurrency: 2, "concurrency" => 8` would otherwise keep one of them silently.
    if let Some(key) = duplicate_key(ruby, hash)? {
        return Err(errors::configuration(
            ruby,
            format!("{key}: given twice (as a Symbol and as a String)"),
        ));
    }
    match ruby_to_json(ruby, hash.as_value(), "config") {
        Ok(Json::Object(map)) => Ok(map),
        Ok(_) => unreachable!("a Hash converts to an object"),
        Err(e) => Err(errors::configuration(ruby, e.to_string())),
    }
}

fn duplicate_key(ruby: &Ruby, hash: RHash) -> Result<Option<String>, Error> {
    let mut seen = std::collections::HashSet::new();
    let mut duplicate = None;
    hash.foreach(|k: Value, _: Value| {
        let key = key_string(ruby, k, "config")?;
        if !seen.insert(key.clone()) {
            duplicate = Some(key);
            return Ok(ForEach::Stop);
        }
        Ok(ForEach::Continue)
    })?;
    Ok(duplicate)
}

/// A Hash built from key/value pairs with one `rb_hash_bulk_insert`, not an `rb_protect`ed
/// `aset` per entry. A fresh Hash with Symbol keys cannot raise there (short of NoMemoryError,
/// which any allocation in this file may raise as well).
fn hash_of(ruby: &Ruby, pairs: &[Value]) -> RHash {
    debug_assert!(pairs.len().is_multiple_of(2));
    let hash = ruby.hash_new();
    // SAFETY: `Value` is `repr(transparent)` over `VALUE`; the pairs live on this (scanned) stack.
    unsafe {
        rb_sys::rb_hash_bulk_insert(
            pairs.len() as std::os::raw::c_long,
            pairs.as_ptr() as *const rb_sys::VALUE,
            hash.as_raw(),
        );
    }
    hash
}

/// A frozen, deduplicated String (Ruby's fstring table): names repeat on every event, so after
/// the first one they cost a table lookup and no allocation.
pub fn interned(s: &str) -> Value {
    // SAFETY: pointer and length of a valid UTF-8 `str`; the encoding is Ruby's UTF-8.
    unsafe {
        Value::from_raw(rb_sys::rb_enc_interned_str(
            s.as_ptr() as *const std::os::raw::c_char,
            s.len() as std::os::raw::c_long,
            rb_sys::rb_utf8_encoding(),
        ))
    }
}

fn sym(ruby: &Ruby, key: &Key) -> Value {
    (**key).into_value_with(ruby)
}

/// A frozen UUID String.
fn frozen_uuid(ruby: &Ruby, id: Uuid) -> Value {
    let s = uuid_str(ruby, id);
    s.freeze();
    s.as_value()
}

/// JSON → deeply frozen Ruby (template data shared by every event of a step).
fn frozen_json_to_ruby(ruby: &Ruby, json: &Json) -> Result<Value, Error> {
    Ok(match json {
        Json::String(s) => interned(s),
        Json::Array(items) => {
            let array = ruby.ary_new_capa(items.len());
            for item in items {
                array.push(frozen_json_to_ruby(ruby, item)?)?;
            }
            array.freeze();
            array.as_value()
        }
        Json::Object(map) => {
            let hash = ruby.hash_new_capa_(map.len());
            for (k, v) in map {
                hash.aset(interned(k), frozen_json_to_ruby(ruby, v)?)?;
            }
            hash.freeze();
            hash.as_value()
        }
        scalar => json_to_ruby(ruby, scalar)?,
    })
}

/// A step's `step_definition` Hash, deeply frozen: the same for every event of that step, so
/// the bridge builds it once and shares it (see `definitions::step_definition`).
pub fn step_definition_to_ruby(ruby: &Ruby, definition: &StepDefinition) -> Result<RHash, Error> {
    let retry = &definition.retry;
    let handler = hash_of(
        ruby,
        &[
            sym(ruby, &CALLABLE),
            interned(&definition.callable),
            sym(ruby, &INITIALIZATION),
            frozen_json_to_ruby(ruby, &definition.initialization)?,
        ],
    );
    handler.freeze();
    let retry_hash = hash_of(
        ruby,
        &[
            sym(ruby, &RETRYABLE),
            retry.retryable.into_value_with(ruby),
            sym(ruby, &MAX_ATTEMPTS),
            retry.max_attempts.into_value_with(ruby),
            sym(ruby, &BACKOFF),
            interned(retry.backoff.as_str()),
            sym(ruby, &BACKOFF_BASE_MS),
            retry.backoff_base_ms.into_value_with(ruby),
            sym(ruby, &MAX_BACKOFF_MS),
            retry.max_backoff_ms.into_value_with(ruby),
        ],
    );
    retry_hash.freeze();
    let dependencies = ruby.ary_new_capa(definition.dependencies.len());
    for d in &definition.dependencies {
        dependencies.push(interned(d))?;
    }
    dependencies.freeze();
    let hash = hash_of(
        ruby,
        &[
            sym(ruby, &NAME),
            interned(&definition.name),
            sym(ruby, &HANDLER),
            handler.as_value(),
            sym(ruby, &DEPENDENCIES),
            dependencies.as_value(),
            sym(ruby, &RETRY),
            retry_hash.as_value(),
            sym(ruby, &TIMEOUT_SECONDS),
            definition.timeout.as_secs_f64().into_value_with(ruby),
            sym(ruby, &ON_TIMEOUT),
            interned(definition.on_timeout.as_str()),
        ],
    );
    hash.freeze();
    Ok(hash)
}

/// A step execution event as the contract describes it (symbol keys; users' data string-keyed).
/// `step_definition` is the step's shared frozen Hash. Names and UUIDs are frozen Strings; the
/// Hashes and users' data (`context`, `dependency_results`) are fresh for each event.
pub fn event_to_ruby(
    ruby: &Ruby,
    event: &StepExecutionEvent,
    step_definition: Value,
) -> Result<RHash, Error> {
    let task = &event.task;
    let definition = &event.definition;
    let task_uuid = frozen_uuid(ruby, task.task_uuid);
    let step_uuid = frozen_uuid(ruby, event.step_uuid);

    let task_hash = hash_of(
        ruby,
        &[
            sym(ruby, &TASK_UUID),
            task_uuid,
            sym(ruby, &NAMESPACE),
            interned(&task.namespace),
            sym(ruby, &NAME),
            interned(&task.name),
            sym(ruby, &VERSION),
            interned(&task.version),
            sym(ruby, &CONTEXT),
            json_to_ruby(ruby, &task.context)?,
        ],
    );
    let retry = &definition.retry;
    let workflow_step = hash_of(
        ruby,
        &[
            sym(ruby, &STEP_UUID),
            step_uuid,
            sym(ruby, &NAME),
            interned(&definition.name),
            sym(ruby, &ATTEMPTS),
            event.attempt.into_value_with(ruby),
            sym(ruby, &MAX_ATTEMPTS),
            retry.max_attempts.into_value_with(ruby),
            sym(ruby, &RETRYABLE),
            retry.retryable.into_value_with(ruby),
        ],
    );
    let dependency_results = ruby.hash_new_capa_(event.dependency_results.len());
    for (name, result) in &event.dependency_results {
        dependency_results.aset(interned(name), json_to_ruby(ruby, result)?)?;
    }
    let tss = hash_of(
        ruby,
        &[
            sym(ruby, &TASK),
            task_hash.as_value(),
            sym(ruby, &WORKFLOW_STEP),
            workflow_step.as_value(),
            sym(ruby, &DEPENDENCY_RESULTS),
            dependency_results.as_value(),
            sym(ruby, &STEP_DEFINITION),
            step_definition,
        ],
    );
    Ok(hash_of(
        ruby,
        &[
            sym(ruby, &EVENT_ID),
            frozen_uuid(ruby, event.event_id),
            sym(ruby, &TASK_UUID),
            task_uuid,
            sym(ruby, &STEP_UUID),
            step_uuid,
            sym(ruby, &TASK_SEQUENCE_STEP),
            tss.as_value(),
            sym(ruby, &READY_AT_NS),
            event.ready_at_ns.into_value_with(ruby),
        ],
    ))
}

/// The fields a completion may carry, in the order of [`CompletionFields`]' slots.
const COMPLETION_KEYS: [&Key; 11] = [
    &EVENT_ID,
    &TASK_UUID,
    &STEP_UUID,
    &SUCCESS,
    &RESULT,
    &METADATA,
    &ERROR_MESSAGE,
    &ERROR_CLASS,
    &RETRYABLE,
    &RETRY_AFTER,
    &COMPLETED_AT,
];

/// A completion Hash's known fields, read in one pass over the Hash (no String allocated to
/// look up a String key). A Symbol key wins over the same name as a String; nil counts as absent.
#[derive(Default)]
struct CompletionFields {
    values: [Option<Value>; 11],
    from_symbol: [bool; 11],
}

impl CompletionFields {
    fn read(hash: RHash) -> Result<Self, Error> {
        let mut fields = Self::default();
        hash.foreach(|key: Value, value: Value| {
            if value.is_nil() {
                return Ok(ForEach::Continue);
            }
            if let Some(symbol) = Symbol::from_value(key) {
                if let Some(i) = COMPLETION_KEYS.iter().position(|k| symbol == ***k) {
                    fields.values[i] = Some(value);
                    fields.from_symbol[i] = true;
                }
            } else if let Some(text) = RString::from_value(key) {
                // SAFETY: the bytes are only compared, before any Ruby call could change them.
                let bytes = unsafe { text.as_slice() };
                if let Some(i) = COMPLETION_KEYS
                    .iter()
                    .position(|k| k.name.as_bytes() == bytes)
                {
                    if !fields.from_symbol[i] {
                        fields.values[i] = Some(value);
                    }
                }
            }
            Ok(ForEach::Continue)
        })?;
        Ok(fields)
    }

    fn get(&self, key: &Key) -> Option<Value> {
        let i = COMPLETION_KEYS
            .iter()
            .position(|k| std::ptr::eq(*k, key))
            .expect("a completion key");
        self.values[i]
    }
}

fn required_uuid(ruby: &Ruby, fields: &CompletionFields, key: &Key) -> Result<Uuid, Error> {
    let value = fields.get(key).expect("presence checked first");
    let name = key.name;
    let text = RString::from_value(value).ok_or_else(|| {
        errors::argument(
            ruby,
            format!("{name} must be a UUID String, got a {}", unsafe {
                value.classname()
            }),
        )
    })?;
    // SAFETY: parsed at once, with no Ruby call in between.
    let parsed = Uuid::try_parse_ascii(unsafe { text.as_slice() });
    parsed.map_err(|_| {
        let shown = text.to_string().unwrap_or_else(|_| "(not UTF-8)".into());
        errors::argument(ruby, format!("{name} must be a UUID, got {shown:?}"))
    })
}

fn optional_string(
    ruby: &Ruby,
    fields: &CompletionFields,
    key: &Key,
) -> Result<Option<String>, Error> {
    let Some(value) = fields.get(key) else {
        return Ok(None);
    };
    let name = key.name;
    match RString::from_value(value) {
        Some(s) => string(ruby, s, name).map(Some),
        None => Err(errors::argument(
            ruby,
            format!("{name} must be a String, got a {}", unsafe {
                value.classname()
            }),
        )),
    }
}

fn optional_bool(ruby: &Ruby, fields: &CompletionFields, key: &Key) -> Result<Option<bool>, Error> {
    match fields.get(key) {
        None => Ok(None),
        Some(v) if v.as_raw() == ruby.qtrue().as_raw() => Ok(Some(true)),
        Some(v) if v.as_raw() == ruby.qfalse().as_raw() => Ok(Some(false)),
        Some(_) => Err(errors::argument(
            ruby,
            format!("{} must be true or false", key.name),
        )),
    }
}

/// Validate a completion Hash; missing or ill-typed fields raise `ArgumentError` naming them.
pub fn completion_from_ruby(
    ruby: &Ruby,
    value: Value,
) -> Result<StepExecutionCompletionEvent, Error> {
    let Some(hash) = RHash::from_value(value) else {
        return Err(errors::argument(
            ruby,
            format!("completion must be a Hash, got a {}", unsafe {
                value.classname()
            }),
        ));
    };
    let fields = CompletionFields::read(hash)?;
    let required = [&EVENT_ID, &TASK_UUID, &STEP_UUID, &SUCCESS];
    let missing: Vec<&str> = required
        .iter()
        .filter(|k| fields.get(k).is_none())
        .map(|k| k.name)
        .collect();
    if !missing.is_empty() {
        return Err(errors::argument(
            ruby,
            format!(
                "Missing required fields in completion: {}",
                missing.join(", ")
            ),
        ));
    }
    let success = optional_bool(ruby, &fields, &SUCCESS)?.expect("presence checked");
    let retry_after = match fields.get(&RETRY_AFTER) {
        None => None,
        // Longer delays wait MAX_RETRY_AFTER (the engine clamps too).
        Some(v) => Some(seconds_at_most(ruby, v, "retry_after", MAX_RETRY_AFTER)?),
    };
    let metadata = match fields.get(&METADATA) {
        None => Json::Object(Map::new()),
        Some(v) => match ruby_to_json(ruby, v, "metadata")? {
            object @ Json::Object(_) => object,
            _ => return Err(errors::argument(ruby, "metadata must be a Hash")),
        },
    };
    Ok(StepExecutionCompletionEvent {
        event_id: required_uuid(ruby, &fields, &EVENT_ID)?,
        task_uuid: required_uuid(ruby, &fields, &TASK_UUID)?,
        step_uuid: required_uuid(ruby, &fields, &STEP_UUID)?,
        success,
        result: match fields.get(&RESULT) {
            None => Json::Null,
            Some(v) => ruby_to_json(ruby, v, "result")?,
        },
        metadata,
        error_message: optional_string(ruby, &fields, &ERROR_MESSAGE)?,
        error_class: optional_string(ruby, &fields, &ERROR_CLASS)?,
        retryable: optional_bool(ruby, &fields, &RETRYABLE)?.unwrap_or(true),
        retry_after,
        completed_at: optional_string(ruby, &fields, &COMPLETED_AT)?,
    })
}

pub fn snapshot_to_ruby(ruby: &Ruby, snapshot: &TaskSnapshot) -> Result<RHash, Error> {
    let hash = ruby.hash_new_capa_(10);
    hash.aset(*TASK_UUID, uuid_str(ruby, snapshot.task_uuid))?;
    hash.aset(*NAMESPACE, ruby.str_new(&snapshot.namespace))?;
    hash.aset(*NAME, ruby.str_new(&snapshot.name))?;
    hash.aset(*VERSION, ruby.str_new(&snapshot.version))?;
    hash.aset(*STATUS, ruby.str_new(snapshot.status.as_str()))?;
    hash.aset(*CREATED_AT, iso8601(ruby, snapshot.created_at_ns))?;
    hash.aset(*COMPLETED_AT, iso8601(ruby, snapshot.completed_at_ns))?;
    let steps = ruby.ary_new_capa(snapshot.steps.len());
    for step in &snapshot.steps {
        steps.push(step_to_ruby(ruby, step)?)?;
    }
    hash.aset(*STEPS, steps)?;
    hash.aset(*STEPS_RETAINED, snapshot.steps_retained)?;
    Ok(hash)
}

/// ns since the Unix epoch → an ISO 8601 UTC String with milliseconds (nil when unknown).
fn iso8601(ruby: &Ruby, ns: Option<u64>) -> Option<RString> {
    ns.map(|ns| {
        let at = std::time::UNIX_EPOCH + Duration::from_nanos(ns);
        ruby.str_new(&humantime::format_rfc3339_millis(at).to_string())
    })
}

fn step_to_ruby(ruby: &Ruby, step: &StepSnapshot) -> Result<RHash, Error> {
    let hash = ruby.hash_new_capa_(11);
    hash.aset(*STEP_UUID, uuid_str(ruby, step.step_uuid))?;
    hash.aset(*NAME, ruby.str_new(&step.name))?;
    hash.aset(*STATUS, ruby.str_new(step.status.as_str()))?;
    hash.aset(*ATTEMPTS, step.attempts)?;
    hash.aset(
        *RESULT,
        match &step.result {
            Some(result) => json_to_ruby(ruby, result)?,
            None => ruby.qnil().as_value(),
        },
    )?;
    hash.aset(
        *METADATA,
        match &step.metadata {
            Some(metadata) => json_to_ruby(ruby, metadata)?,
            None => ruby.hash_new().as_value(),
        },
    )?;
    hash.aset(
        *ERROR_MESSAGE,
        step.error_message.as_deref().map(|m| ruby.str_new(m)),
    )?;
    hash.aset(*STARTED_AT, iso8601(ruby, step.started_at_ns))?;
    hash.aset(*COMPLETED_AT, iso8601(ruby, step.completed_at_ns))?;
    let duration_ms = match (step.started_at_ns, step.completed_at_ns) {
        (Some(start), Some(end)) => Some(end.saturating_sub(start) as f64 / 1e6),
        _ => None,
    };
    hash.aset(*DURATION_MS, duration_ms)?;
    Ok(hash)
}

/// A handler to interrupt, for the Ruby thread that raises into handler threads.
pub fn interrupt_to_ruby(ruby: &Ruby, interrupt: &StepInterrupt) -> Result<RHash, Error> {
    let hash = ruby.hash_new_capa_(7);
    hash.aset(*EVENT_ID, uuid_str(ruby, interrupt.event_id))?;
    hash.aset(*TASK_UUID, uuid_str(ruby, interrupt.task_uuid))?;
    hash.aset(*STEP_UUID, uuid_str(ruby, interrupt.step_uuid))?;
    hash.aset(*STEP_NAME, ruby.str_new(&interrupt.step_name))?;
    hash.aset(*ATTEMPT, interrupt.attempt)?;
    hash.aset(*TIMEOUT_SECONDS, interrupt.timeout.as_secs_f64())?;
    hash.aset(*REASON, ruby.to_symbol(interrupt.reason.as_str()))?;
    Ok(hash)
}

pub fn status_to_ruby(ruby: &Ruby, status: &WorkerSystemStatus) -> Result<RHash, Error> {
    let hash = ruby.hash_new_capa_(17);
    hash.aset(*RUNNING, status.running)?;
    hash.aset(*STATE, ruby.str_new(status.state.as_str()))?;
    hash.aset(*QUIET, status.quiet)?;
    hash.aset(*WORKER_ID, ruby.str_new(&status.worker_id))?;
    hash.aset(*ENVIRONMENT, ruby.str_new(&status.environment))?;
    hash.aset(*BACKEND, ruby.str_new(status.backend))?;
    hash.aset(*DEPLOYMENT_MODE, ruby.str_new(status.deployment_mode))?;
    hash.aset(*CONCURRENCY, status.concurrency)?;
    hash.aset(*UPTIME_SECONDS, status.uptime_seconds)?;
    hash.aset(*STEPS_PROCESSED, status.steps_processed)?;
    hash.aset(*STEPS_FAILED, status.steps_failed)?;
    hash.aset(*STEPS_IN_FLIGHT, status.steps_in_flight)?;
    let namespaces = ruby.ary_new_capa(status.supported_namespaces.len());
    for ns in &status.supported_namespaces {
        namespaces.push(ruby.str_new(ns))?;
    }
    hash.aset(*SUPPORTED_NAMESPACES, namespaces)?;
    hash.aset(*WEB_API_ENABLED, status.web_api_enabled)?;
    if let Some(address) = status.web_api_bind {
        hash.aset(*WEB_API_BIND, ruby.str_new(&address.to_string()))?;
    }
    hash.aset(*DATABASE_POOL_SIZE, status.database_pool_size)?;
    hash.aset(*DATABASE_POOL_IDLE, status.database_pool_idle)?;
    Ok(hash)
}

pub fn stopped_status(ruby: &Ruby) -> Result<RHash, Error> {
    let hash = ruby.hash_new_capa_(2);
    hash.aset(*RUNNING, false)?;
    hash.aset(*STATE, ruby.str_new("stopped"))?;
    Ok(hash)
}

/// The optional config Hash of `bootstrap_worker` / `template_handlers`, parsed and validated
/// (unknown keys and bad values raise `ConfigurationError` naming the key).
pub fn config_from_args(ruby: &Ruby, args: &[Value]) -> Result<tasker_worker::WorkerConfig, Error> {
    let config = match args {
        [] => ruby.qnil().as_value(),
        [config] => *config,
        _ => {
            return Err(errors::argument(
                ruby,
                format!(
                    "wrong number of arguments (given {}, expected 0..1)",
                    args.len()
                ),
            ))
        }
    };
    let mut map = config_map(ruby, config)?;
    // Rails' and Rack's environment variables are Ruby's: the engine itself reads TASKER_ENV only.
    if map.get("environment").is_none_or(Json::is_null) {
        if let Some(environment) = ["TASKER_ENV", "RAILS_ENV", "RACK_ENV"]
            .iter()
            .find_map(|key| std::env::var(key).ok().filter(|s| !s.is_empty()))
        {
            map.insert("environment".into(), Json::String(environment));
        }
    }
    let mut config = tasker_worker::WorkerConfig::from_map(&map, |key| std::env::var(key).ok())
        .map_err(|e| errors::engine(ruby, e))?;
    config.callable_rule = ruby_constant_path;
    Ok(config)
}

/// Ruby's rule for `handler.callable`: `Foo`, `Foo::Bar2`, optionally with a leading `::`.
pub fn ruby_constant_path(callable: &str) -> Result<(), String> {
    let path = callable.strip_prefix("::").unwrap_or(callable);
    let valid = path.split("::").all(|part| {
        let mut chars = part.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_uppercase())
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    if valid {
        Ok(())
    } else {
        Err("is not a Ruby class name (expected e.g. Fulfillment::ValidateOrder)".into())
    }
}
