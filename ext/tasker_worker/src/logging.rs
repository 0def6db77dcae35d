//! One tracing subscriber for the process: the engine's logs and the logs Ruby sends through
//! `TaskerCore::FFI.log_*` share its stream (stderr) and format. The level can change at bootstrap.

use crate::config::LogLevel;
use std::sync::OnceLock;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{fmt, reload, Registry};

static RELOAD: OnceLock<Option<reload::Handle<LevelFilter, Registry>>> = OnceLock::new();

fn to_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Trace => LevelFilter::TRACE,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Error => LevelFilter::ERROR,
    }
}

/// Install the subscriber once; the initial level comes from `TASKER_LOG_LEVEL` (default info).
/// If the host process already installed a global subscriber, ours stays out of its way.
pub fn init() {
    RELOAD.get_or_init(|| {
        let level = std::env::var("TASKER_LOG_LEVEL")
            .ok()
            .and_then(|v| LogLevel::parse(v.trim()))
            .unwrap_or(LogLevel::Info);
        let (filter, handle) = reload::Layer::new(to_filter(level));
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let subscriber = Registry::default()
            .with(filter)
            .with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi));
        tracing::subscriber::set_global_default(subscriber)
            .ok()
            .map(|_| handle)
    });
}

pub fn set_level(level: LogLevel) {
    init();
    if let Some(Some(handle)) = RELOAD.get() {
        let _ = handle.modify(|filter| *filter = to_filter(level));
    }
}
