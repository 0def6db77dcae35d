//! `TaskerCore::FFI.list_tasks(params)`: one page of tasks, newest first (`TaskerCore.tasks`).

use crate::bridge::{await_reply, require_worker};
use crate::convert;
use crate::errors;
use magnus::{function, prelude::*, Error, RHash, RModule, Ruby, Value};
use serde_json::Value as Json;
use tasker_worker::task_list::{iso8601, TaskPage, TaskQuery};
use tasker_worker::EngineError;

pub fn init(module: RModule) -> Result<(), Error> {
    let ffi = module.define_module("FFI")?;
    ffi.define_singleton_method("list_tasks", function!(list_tasks, 1))?;
    Ok(())
}

/// `params`: `status`, `namespace`, `name`, `created_after` (seconds since the epoch or an ISO 8601
/// String), `limit`, `cursor`; nil values count as not given. Returns `{tasks: [...], next_cursor:}`.
fn list_tasks(ruby: &Ruby, params: Value) -> Result<RHash, Error> {
    errors::guard(ruby, || {
        let params = match convert::ruby_to_json(ruby, params, "params")? {
            Json::Object(map) => map,
            Json::Null => Default::default(),
            _ => return Err(errors::argument(ruby, "params must be a Hash")),
        };
        let query = TaskQuery::from_params(&params).map_err(|e| errors::engine(ruby, e))?;
        let system = require_worker(ruby)?;
        let reply = system
            .request_list_tasks(query)
            .map_err(|e| errors::engine(ruby, e))?;
        match await_reply(ruby, reply, None)? {
            Some(Ok(page)) => page_to_ruby(ruby, &page),
            Some(Err(e)) => Err(errors::engine(ruby, e)),
            None => Err(errors::engine(
                ruby,
                EngineError::Internal("no answer to list_tasks".into()),
            )),
        }
    })
}

fn page_to_ruby(ruby: &Ruby, page: &TaskPage) -> Result<RHash, Error> {
    let tasks = ruby.ary_new_capa(page.tasks.len());
    for task in &page.tasks {
        let hash = ruby.hash_new();
        hash.aset(ruby.to_symbol("task_uuid"), task.task_uuid.to_string())?;
        hash.aset(ruby.to_symbol("namespace"), task.namespace.as_str())?;
        hash.aset(ruby.to_symbol("name"), task.name.as_str())?;
        hash.aset(ruby.to_symbol("version"), task.version.as_str())?;
        hash.aset(ruby.to_symbol("status"), task.status.as_str())?;
        hash.aset(
            ruby.to_symbol("created_at"),
            iso8601(Some(task.created_at_ns)),
        )?;
        hash.aset(
            ruby.to_symbol("completed_at"),
            iso8601(task.completed_at_ns),
        )?;
        tasks.push(hash)?;
    }
    let hash = ruby.hash_new();
    hash.aset(ruby.to_symbol("tasks"), tasks)?;
    hash.aset(ruby.to_symbol("next_cursor"), page.next_cursor.as_deref())?;
    Ok(hash)
}
