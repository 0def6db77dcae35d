//! `TaskerCore::FFI.task_graph` and `TaskerCore::FFI.web_call`: the task picture, and the web
//! routes for the Rack app `TaskerCore::Web` (the same router the worker's own server runs).

use crate::bridge::require_worker;
use crate::errors;
use crate::gvl::{check_interrupts, without_gvl};
use crate::tasks::snapshot;
use magnus::{function, prelude::*, Error, RModule, RString, Ruby, Value};
use std::sync::{Arc, Mutex};
use tasker_worker::graph::{self, GraphFormat};
use tasker_worker::web::WebApp;
use tasker_worker::WorkerSystemHandle;

pub fn init(module: RModule) -> Result<(), Error> {
    let ffi = module.define_module("FFI")?;
    ffi.define_singleton_method("task_graph", function!(task_graph, 2))?;
    ffi.define_singleton_method("web_call", function!(web_call, 6))?;
    Ok(())
}

/// `task_graph(uuid, format)`: format is "mermaid", "dot" or "svg" (checked before the uuid).
fn task_graph(ruby: &Ruby, task_uuid: Value, format: String) -> Result<String, Error> {
    errors::guard(ruby, || {
        let format = GraphFormat::parse(&format).ok_or_else(|| {
            errors::argument(
                ruby,
                format!(
                    "format: {format:?} is not one of {} (task_graph(uuid, format: :svg))",
                    GraphFormat::NAMES
                ),
            )
        })?;
        let system = require_worker(ruby)?;
        let snapshot = snapshot(ruby, &system, task_uuid)?;
        let template = system
            .templates()
            .get(&snapshot.namespace, &snapshot.name, &snapshot.version)
            .cloned();
        Ok(graph::render(&snapshot, template.as_deref(), format))
    })
}

/// The web app of the current worker, for one (token, actions) setting, made on first use.
struct Mounted {
    system: Arc<WorkerSystemHandle>,
    pid: u32,
    token: Option<String>,
    actions: bool,
    app: Arc<WebApp>,
}

static MOUNTED: Mutex<Option<Mounted>> = Mutex::new(None);

/// The app for this worker and setting: made again when the worker or the setting changed. The
/// old one's runtime is dropped here, without the GVL (the caller's thread joins its thread).
fn app_for(
    system: Arc<WorkerSystemHandle>,
    token: Option<String>,
    actions: bool,
) -> Result<Arc<WebApp>, tasker_worker::EngineError> {
    let mut mounted = MOUNTED.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if let Some(current) = mounted.as_ref() {
        if current.pid != pid {
            // Forked: the parent's runtime threads do not exist here; never touch them.
            if let Some(stale) = mounted.take() {
                std::mem::forget(stale);
            }
        } else if Arc::ptr_eq(&current.system, &system)
            && current.token == token
            && current.actions == actions
        {
            return Ok(Arc::clone(&current.app));
        }
    }
    let app = Arc::new(system.web_app(token.clone(), actions)?);
    *mounted = Some(Mounted {
        system,
        pid,
        token,
        actions,
        app: Arc::clone(&app),
    });
    Ok(app)
}

/// Drop the Rack app's routes of a stopped worker (without the GVL: the runtime's thread is
/// joined). A request still running elsewhere keeps its own reference until it ends.
pub(crate) fn unmount(system: &Arc<WorkerSystemHandle>) {
    let stale = {
        let mut mounted = MOUNTED.lock().unwrap_or_else(|e| e.into_inner());
        if mounted
            .as_ref()
            .is_some_and(|m| m.pid == std::process::id() && Arc::ptr_eq(&m.system, system))
        {
            mounted.take()
        } else {
            None
        }
    };
    drop(stale);
}

/// What `web_call` returns: `[status, [[name, value], ...], body]`.
type RackTriple = (u16, Vec<(String, String)>, RString);

/// `web_call(method, path_and_query, headers, body, token, actions)` → `[status, headers, body]`.
/// Answered without the GVL: a Ruby thread busy elsewhere does not slow a dashboard request,
/// and the request does not hold other Ruby threads up.
fn web_call(
    ruby: &Ruby,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: RString,
    token: Option<String>,
    actions: bool,
) -> Result<RackTriple, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        // SAFETY: the bytes are copied before any other Ruby call.
        let body = unsafe { body.as_slice() }.to_vec();
        let answer = loop {
            let request = (method.as_str(), path.as_str(), &headers, body.clone());
            let system = Arc::clone(&system);
            let token = token.clone();
            let ran = without_gvl(ruby, move |_cancel| {
                let app = app_for(system, token, actions)?;
                app.call(request.0, request.1, request.2, request.3)
            })?;
            match ran {
                Some(answer) => break answer.map_err(|e| errors::engine(ruby, e))?,
                None => check_interrupts(ruby)?,
            }
        };
        Ok((
            answer.status,
            answer.headers,
            ruby.str_from_slice(&answer.body),
        ))
    })
}
