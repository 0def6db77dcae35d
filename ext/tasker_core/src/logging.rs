//! `TaskerCore::FFI.log_*`: Ruby's log lines through the engine's tracing subscriber, so both
//! share one stream, one format and one level.

use crate::convert;
use crate::errors;
use crate::gvl::{check_interrupts, without_gvl, without_gvl_retrying};
use magnus::{
    function, prelude::*, r_hash::ForEach, Error, RArray, RHash, RModule, RString, Ruby, Value,
};
use std::fmt::Write as _;
use tasker_worker::logging::RelayTake;
use tracing::Level;

pub fn init(_ruby: &Ruby, ffi: RModule) -> Result<(), Error> {
    tasker_worker::logging::init();
    ffi.define_singleton_method("log_trace", function!(log_trace, -1))?;
    ffi.define_singleton_method("log_debug", function!(log_debug, -1))?;
    ffi.define_singleton_method("log_info", function!(log_info, -1))?;
    ffi.define_singleton_method("log_warn", function!(log_warn, -1))?;
    ffi.define_singleton_method("log_error", function!(log_error, -1))?;
    ffi.define_singleton_method("log_enabled?", function!(log_enabled, 1))?;
    ffi.define_singleton_method("flush_logs", function!(flush_logs, 0))?;
    ffi.define_singleton_method("dropped_log_lines", function!(dropped_log_lines, 0))?;
    ffi.define_singleton_method("take_log_lines", function!(take_log_lines, 2))?;
    Ok(())
}

fn log_trace(ruby: &Ruby, args: &[Value]) -> Result<(), Error> {
    log(ruby, Level::TRACE, args)
}
fn log_debug(ruby: &Ruby, args: &[Value]) -> Result<(), Error> {
    log(ruby, Level::DEBUG, args)
}
fn log_info(ruby: &Ruby, args: &[Value]) -> Result<(), Error> {
    log(ruby, Level::INFO, args)
}
fn log_warn(ruby: &Ruby, args: &[Value]) -> Result<(), Error> {
    log(ruby, Level::WARN, args)
}
fn log_error(ruby: &Ruby, args: &[Value]) -> Result<(), Error> {
    log(ruby, Level::ERROR, args)
}

fn parse_level(ruby: &Ruby, level: &str) -> Result<Level, Error> {
    Ok(match level {
        "trace" => Level::TRACE,
        "debug" => Level::DEBUG,
        "info" => Level::INFO,
        "warn" => Level::WARN,
        "error" => Level::ERROR,
        other => {
            return Err(errors::argument(
                ruby,
                format!("unknown log level {other:?}"),
            ))
        }
    })
}

/// Write out every queued line (at exit; a stopping worker flushes by itself). Waits up to about
/// a second, with the GVL released.
fn flush_logs(ruby: &Ruby) -> Result<(), Error> {
    errors::guard(ruby, || {
        without_gvl_retrying(ruby, |_| {
            tasker_worker::logging::flush();
            Some(())
        })
    })
}

/// Lines dropped because the log writer's queue was full (it never blocks the thread that logs).
fn dropped_log_lines() -> u64 {
    tasker_worker::logging::dropped_lines()
}

/// `take_log_lines(max, timeout_seconds)`: up to `max` lines written while `log_output` is
/// "rails", waiting (GVL released) up to `timeout_seconds` for the first; `[]` when none came.
/// The Ruby thread that calls it writes them to Rails.logger: lines are made on engine threads,
/// which never call Ruby, and wait for no logger.
fn take_log_lines(ruby: &Ruby, max: usize, timeout: Value) -> Result<RArray, Error> {
    errors::guard(ruby, || {
        let timeout =
            convert::seconds_at_most(ruby, timeout, "timeout", std::time::Duration::from_secs(60))?;
        let take = without_gvl(ruby, |cancel| {
            tasker_worker::logging::take_relayed_lines(max, timeout, cancel)
        })?;
        let lines = match take {
            Some(RelayTake::Lines(lines)) => lines,
            Some(RelayTake::Nothing) => Vec::new(),
            Some(RelayTake::Cancelled) | None => {
                check_interrupts(ruby)?;
                Vec::new()
            }
        };
        let array = ruby.ary_new_capa(lines.len());
        for line in lines {
            array.push(ruby.str_new(&line))?;
        }
        Ok(array)
    })
}

/// Lets the Ruby Logger skip building messages that would be filtered out.
fn log_enabled(ruby: &Ruby, level: String) -> Result<bool, Error> {
    let level = parse_level(ruby, &level)?;
    Ok(enabled(level))
}

fn enabled(level: Level) -> bool {
    macro_rules! check {
        ($($l:ident),*) => { match level { $(Level::$l => tracing::enabled!(target: "tasker_core::ruby", Level::$l),)* } };
    }
    check!(TRACE, DEBUG, INFO, WARN, ERROR)
}

fn log(ruby: &Ruby, level: Level, args: &[Value]) -> Result<(), Error> {
    errors::guard(ruby, || {
        let (message, context) = match args {
            [message] => (*message, None),
            [message, context] => (*message, Some(*context)),
            _ => {
                return Err(errors::argument(
                    ruby,
                    format!(
                        "wrong number of arguments (given {}, expected 1..2)",
                        args.len()
                    ),
                ))
            }
        };
        if !enabled(level) {
            return Ok(());
        }
        let message: String = message.funcall::<_, _, RString>("to_s", ())?.to_string()?;
        let (progname, fields) = match context.filter(|c| !c.is_nil()) {
            None => (None, String::new()),
            Some(c) => {
                let hash = RHash::from_value(c)
                    .ok_or_else(|| errors::argument(ruby, "log context must be a Hash"))?;
                render_context(ruby, hash)?
            }
        };
        // Fields are fixed per call site in tracing, hence one event per combination.
        macro_rules! emit {
            ($($l:ident),*) => { match level { $(Level::$l => match (&progname, fields.is_empty()) {
                (None, true) => tracing::event!(target: "tasker_core::ruby", Level::$l, "{message}"),
                (None, false) => tracing::event!(target: "tasker_core::ruby", Level::$l,
                    ruby_fields = %fields, "{message}"),
                (Some(progname), true) => tracing::event!(target: "tasker_core::ruby", Level::$l,
                    progname = %progname, "{message}"),
                (Some(progname), false) => tracing::event!(target: "tasker_core::ruby", Level::$l,
                    progname = %progname, ruby_fields = %fields, "{message}"),
            },)* } };
        }
        // Queuing a line takes the subscriber's locks (the output may be swapped meanwhile by a
        // bootstrap), and no lock is taken with the GVL held.
        without_gvl_retrying(ruby, |_| {
            emit!(TRACE, DEBUG, INFO, WARN, ERROR);
            Some(())
        })
    })
}

/// `{progname: "app", user_id: 7, "op" => "x"}` → `(Some("app"), {"op":"x","user_id":7})`: the
/// Logger's progname as a field of its own (unquoted in text), the rest spread out as fields of the
/// line by the subscriber's formatter (values as JSON where possible, else their `inspect`).
fn render_context(ruby: &Ruby, hash: RHash) -> Result<(Option<String>, String), Error> {
    let mut progname = None;
    // In the caller's order (a serde_json::Map would sort the keys).
    let mut fields: Vec<(String, serde_json::Value)> = Vec::new();
    hash.foreach(|k: Value, v: Value| {
        let key = k.funcall::<_, _, RString>("to_s", ())?.to_string()?;
        let value = match convert::ruby_to_json(ruby, v, "log context") {
            Ok(json) => json,
            Err(_) => serde_json::Value::String(v.inspect()),
        };
        match value {
            serde_json::Value::String(name) if key == "progname" => progname = Some(name),
            value => match fields.iter_mut().find(|(k, _)| *k == key) {
                // `:a` and `"a"` both name field a: the last one wins, as in a Hash.
                Some(entry) => entry.1 = value,
                None => fields.push((key, value)),
            },
        }
        Ok(ForEach::Continue)
    })?;
    let mut object = String::new();
    for (key, value) in &fields {
        object.push(if object.is_empty() { '{' } else { ',' });
        let _ = write!(object, "{}:{value}", serde_json::Value::String(key.clone()));
    }
    if !object.is_empty() {
        object.push('}');
    }
    let fields = object;
    Ok((progname, fields))
}
