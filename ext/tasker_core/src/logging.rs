//! `TaskerCore::FFI.log_*`: Ruby's log lines through the engine's tracing subscriber, so both
//! share one stream, one format and one level.

use crate::convert;
use crate::errors;
use crate::gvl::without_gvl_retrying;
use magnus::{function, prelude::*, r_hash::ForEach, Error, RHash, RModule, RString, Ruby, Value};
use std::fmt::Write;
use tracing::Level;

pub fn init(_ruby: &Ruby, ffi: RModule) -> Result<(), Error> {
    tasker_worker::logging::init();
    ffi.define_singleton_method("log_trace", function!(log_trace, -1))?;
    ffi.define_singleton_method("log_debug", function!(log_debug, -1))?;
    ffi.define_singleton_method("log_info", function!(log_info, -1))?;
    ffi.define_singleton_method("log_warn", function!(log_warn, -1))?;
    ffi.define_singleton_method("log_error", function!(log_error, -1))?;
    ffi.define_singleton_method("log_enabled?", function!(log_enabled, 1))?;
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
        let context = match context.filter(|c| !c.is_nil()) {
            None => String::new(),
            Some(c) => {
                let hash = RHash::from_value(c)
                    .ok_or_else(|| errors::argument(ruby, "log context must be a Hash"))?;
                render_context(ruby, hash)?
            }
        };
        macro_rules! emit {
            ($($l:ident),*) => { match level { $(Level::$l => if context.is_empty() {
                tracing::event!(target: "tasker_core::ruby", Level::$l, "{message}")
            } else {
                tracing::event!(target: "tasker_core::ruby", Level::$l, context = %context, "{message}")
            },)* } };
        }
        // Written with the GVL released: writing takes stderr's lock, which the engine thread may
        // hold for as long as stderr is slow (a full pipe), and no lock is taken with the GVL held.
        without_gvl_retrying(ruby, |_| {
            emit!(TRACE, DEBUG, INFO, WARN, ERROR);
            Some(())
        })
    })
}

/// `{user_id: 7, "op" => "x"}` → `user_id=7 op="x"` (values as JSON where possible).
fn render_context(ruby: &Ruby, hash: RHash) -> Result<String, Error> {
    let mut out = String::new();
    hash.foreach(|k: Value, v: Value| {
        let key = k.funcall::<_, _, RString>("to_s", ())?.to_string()?;
        let value = match convert::ruby_to_json(ruby, v, "log context") {
            Ok(json) => json.to_string(),
            Err(_) => v.inspect(),
        };
        if !out.is_empty() {
            out.push(' ');
        }
        let _ = write!(out, "{key}={value}");
        Ok(ForEach::Continue)
    })?;
    Ok(out)
}
