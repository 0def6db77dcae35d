//! What `TaskerCore::Testing` (test mode: tasks run in the calling thread, no engine) takes from
//! the engine so that a spec passing inline passes on a worker: the templates, loaded and
//! validated by the same code as `bootstrap_worker` (a bad template fails with the same error),
//! and the same conversions of contexts, results and completions at the Ruby boundary.
//! Starts nothing and keeps nothing.

use crate::convert;
use crate::errors;
use crate::gvl::without_gvl_retrying;
use magnus::{function, prelude::*, Error, RHash, RModule, RString, Ruby, Value};
use tasker_worker::WorkerBootstrap;

pub fn init(module: RModule) -> Result<(), Error> {
    let ffi = module.define_module("FFI")?;
    ffi.define_singleton_method("testing_templates", function!(testing_templates, -1))?;
    ffi.define_singleton_method("testing_json", function!(testing_json, 2))?;
    ffi.define_singleton_method("testing_completion", function!(testing_completion, 1))?;
    ffi.define_singleton_method("testing_run_at", function!(testing_run_at, 1))?;
    Ok(())
}

/// `testing_run_at(request)`: the request's `run_at:` checked as `create_task` checks it, as
/// seconds since the epoch (nil without one); ArgumentError naming `run_at` otherwise.
fn testing_run_at(ruby: &Ruby, request: RHash) -> Result<Option<f64>, Error> {
    errors::guard(ruby, || {
        Ok(crate::tasks::run_at_of(ruby, request)?.map(|t| {
            t.duration_since(std::time::SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        }))
    })
}

/// `testing_templates(config = nil)`: `{templates: [{namespace:, name:, version:, source:,
/// steps: [step_definition, ...]}], namespaces: [...], known: String}` for the templates a worker
/// started with `config` would run. Each `step_definition` is the frozen Hash a handler sees on
/// a worker; `known` is how the engine lists the templates in an "unknown template" error.
fn testing_templates(ruby: &Ruby, args: &[Value]) -> Result<RHash, Error> {
    errors::guard(ruby, || {
        let config = convert::config_from_args(ruby, args)?;
        // Reading template files is I/O: done without the GVL, as bootstrap_worker does.
        let (templates, namespaces) =
            without_gvl_retrying(ruby, |_| Some(WorkerBootstrap::templates(&config)))?
                .map_err(|e| errors::engine(ruby, e))?;

        let list = ruby.ary_new_capa(templates.len());
        let mut sorted: Vec<_> = templates.iter().collect();
        sorted.sort_by_key(|t| t.key());
        for template in sorted {
            let steps = ruby.ary_new_capa(template.steps.len());
            for step in &template.steps {
                steps.push(convert::step_definition_to_ruby(ruby, step)?)?;
            }
            let hash = ruby.hash_new();
            hash.aset(ruby.to_symbol("namespace"), template.namespace.as_str())?;
            hash.aset(ruby.to_symbol("name"), template.name.as_str())?;
            hash.aset(ruby.to_symbol("version"), template.version.as_str())?;
            hash.aset(
                ruby.to_symbol("source"),
                template.source.display().to_string(),
            )?;
            hash.aset(ruby.to_symbol("steps"), steps)?;
            list.push(hash)?;
        }
        let names = ruby.ary_new_capa(namespaces.len());
        for namespace in namespaces {
            names.push(namespace)?;
        }
        let hash = ruby.hash_new();
        hash.aset(ruby.to_symbol("templates"), list)?;
        hash.aset(ruby.to_symbol("namespaces"), names)?;
        hash.aset(ruby.to_symbol("known"), templates.describe_known())?;
        Ok(hash)
    })
}

/// `testing_json(value, what)`: `value` as it comes back from the engine once stored (Symbols
/// become Strings, Hash keys Strings); raises `ArgumentError` naming `what` for what the engine
/// refuses (a value that is not JSON-able, an integer past 64 bits, NaN, nesting too deep).
fn testing_json(ruby: &Ruby, value: Value, what: RString) -> Result<Value, Error> {
    errors::guard(ruby, || {
        let what = what.to_string()?;
        let json = convert::ruby_to_json(ruby, value, &what)?;
        convert::json_to_ruby(ruby, &json)
    })
}

/// `testing_completion(hash)`: the completion as the engine reads it (`ArgumentError` for what
/// `send_step_completion_event` refuses): `{success:, result:, metadata:, error_class:,
/// error_message:, retryable:, retry_after: (Float seconds, at most a year, or nil)}`.
fn testing_completion(ruby: &Ruby, completion: Value) -> Result<RHash, Error> {
    errors::guard(ruby, || {
        let completion = convert::completion_from_ruby(ruby, completion)?;
        let hash = ruby.hash_new();
        hash.aset(ruby.to_symbol("success"), completion.success)?;
        hash.aset(
            ruby.to_symbol("result"),
            convert::json_to_ruby(ruby, &completion.result)?,
        )?;
        hash.aset(
            ruby.to_symbol("metadata"),
            convert::json_to_ruby(ruby, &completion.metadata)?,
        )?;
        hash.aset(
            ruby.to_symbol("error_class"),
            completion.error_class.clone(),
        )?;
        hash.aset(
            ruby.to_symbol("error_message"),
            completion.error_message.clone(),
        )?;
        hash.aset(ruby.to_symbol("retryable"), completion.retryable)?;
        hash.aset(
            ruby.to_symbol("retry_after"),
            completion.retry_after.map(|d| d.as_secs_f64()),
        )?;
        hash.aset(
            ruby.to_symbol("failure_message"),
            completion.failure_message(),
        )?;
        Ok(hash)
    })
}
