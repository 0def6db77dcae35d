//! One tracing subscriber for the process: the engine's logs and the logs Ruby sends through
//! `TaskerCore::FFI.log_*` share its stream and format. Level, format (`log_format`) and output
//! (`log_output`) can change at bootstrap.
//!
//! Lines are written by a background thread (`tracing_appender::non_blocking`): an event only
//! queues its formatted line, so a slow or full stream never blocks the thread that logs (a Ruby
//! thread, the engine). The queue holds [`BUFFERED_LINES`] lines; when it is full the line is
//! dropped (lossy) and counted in [`dropped_lines`], because blocking would stall the engine and
//! every Ruby thread that logs behind a stalled reader. The queue is drained at [`flush`] (when a
//! worker stops, and at exit).

use crate::config::{LogFormat, LogLevel, LogOutput};
use crate::error::{EngineError, EngineResult};
use serde_json::Value;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::Layered;
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{fmt as tfmt, reload, Layer, Registry};

/// The field Ruby's log context travels in: a JSON object whose keys become fields of the line.
pub const RUBY_FIELDS: &str = "ruby_fields";

/// Lines queued for the writer thread before new ones are dropped.
pub const BUFFERED_LINES: usize = 128_000;

type Filtered = Layered<reload::Layer<LevelFilter, Registry>, Registry>;
type OutputLayer = Box<dyn Layer<Filtered> + Send + Sync>;

struct Sink {
    format: LogFormat,
    output: LogOutput,
    guard: Option<WorkerGuard>,
    dropped: ErrorCounter,
}

struct Installed {
    level: reload::Handle<LevelFilter, Registry>,
    output: reload::Handle<OutputLayer, Filtered>,
    sink: Mutex<Sink>,
}

static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();
/// Lines dropped by writers already replaced (the current one counts its own).
static DROPPED_BEFORE: AtomicU64 = AtomicU64::new(0);

/// The tracing filter of a configured level (the bridges that install their own subscriber use it too).
pub fn to_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Trace => LevelFilter::TRACE,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Error => LevelFilter::ERROR,
    }
}

fn open(output: &LogOutput) -> std::io::Result<(NonBlocking, WorkerGuard)> {
    let builder = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("tasker-log-writer");
    Ok(match output {
        LogOutput::Stderr => builder.finish(std::io::stderr()),
        LogOutput::Stdout => builder.finish(std::io::stdout()),
        LogOutput::File(path) => builder.finish(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
        LogOutput::Relay => builder.finish(RelayWriter),
    })
}

/// Lines waiting for the host language's logger thread (`log_output: "rails"`) before new ones
/// are dropped and counted: the logger may be slow (a remote sink, a lock), and the engine must
/// never wait for it.
pub const RELAYED_LINES: usize = 10_000;

struct Relay {
    lines: crossbeam_channel::Sender<String>,
    taken: crossbeam_channel::Receiver<String>,
    dropped: AtomicU64,
}

fn relay() -> &'static Relay {
    static RELAY: OnceLock<Relay> = OnceLock::new();
    RELAY.get_or_init(|| {
        let (lines, taken) = crossbeam_channel::bounded(RELAYED_LINES);
        Relay {
            lines,
            taken,
            dropped: AtomicU64::new(0),
        }
    })
}

/// The writer of `LogOutput::Relay`, called by the log writer thread with one formatted line
/// per write: queues it without waiting (full: dropped and counted).
struct RelayWriter;

impl std::io::Write for RelayWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf).trim_end().to_owned();
        if !line.is_empty() && relay().lines.try_send(line).is_err() {
            relay().dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a wait for relayed lines ended with.
pub enum RelayTake {
    Lines(Vec<String>),
    /// `timeout` passed with none.
    Nothing,
    /// `cancel` fired (the waiting thread is interrupted).
    Cancelled,
}

/// Up to `max` lines relayed for the host's logger (`log_output: "rails"`), waiting up to
/// `timeout` for the first one. Blocks: never call it with the GVL held.
pub fn take_relayed_lines(
    max: usize,
    timeout: std::time::Duration,
    cancel: &crossbeam_channel::Receiver<()>,
) -> RelayTake {
    let taken = &relay().taken;
    let first = match taken.try_recv() {
        Ok(line) => line,
        Err(_) => {
            crossbeam_channel::select! {
                recv(taken) -> line => match line {
                    Ok(line) => line,
                    Err(_) => return RelayTake::Nothing,
                },
                recv(cancel) -> _ => return RelayTake::Cancelled,
                default(timeout) => return RelayTake::Nothing,
            }
        }
    };
    let mut lines = vec![first];
    while lines.len() < max.max(1) {
        match taken.try_recv() {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    RelayTake::Lines(lines)
}

fn layer(format: LogFormat, output: &LogOutput, writer: NonBlocking) -> OutputLayer {
    let ansi = match output {
        LogOutput::Stderr => std::io::IsTerminal::is_terminal(&std::io::stderr()),
        LogOutput::Stdout => std::io::IsTerminal::is_terminal(&std::io::stdout()),
        LogOutput::File(_) | LogOutput::Relay => false,
    };
    match format {
        LogFormat::Text => tfmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .fmt_fields(text_fields())
            .boxed(),
        LogFormat::Json => tfmt::layer()
            .with_writer(writer)
            .with_ansi(false)
            .event_format(JsonLine)
            .boxed(),
    }
}

/// Install the subscriber once (text on stderr); the initial level comes from `TASKER_LOG_LEVEL`
/// (default info). Called by a bridge that wants the engine's own output (the Ruby one, at load);
/// the engine never installs it by itself. If the host process already installed a global
/// subscriber, ours stays out of its way.
pub fn init() {
    INSTALLED.get_or_init(|| {
        let level = std::env::var("TASKER_LOG_LEVEL")
            .ok()
            .and_then(|v| LogLevel::parse(v.trim()))
            .unwrap_or(LogLevel::Info);
        let (filter, level_handle) = reload::Layer::new(to_filter(level));
        let output = LogOutput::Stderr;
        let (writer, guard) = open(&output).ok()?;
        let dropped = writer.error_counter();
        let (output_layer, output_handle) =
            reload::Layer::new(layer(LogFormat::Text, &output, writer));
        let subscriber = Registry::default().with(filter).with(output_layer);
        tracing::subscriber::set_global_default(subscriber).ok()?;
        Some(Installed {
            level: level_handle,
            output: output_handle,
            sink: Mutex::new(Sink {
                format: LogFormat::Text,
                output,
                guard: Some(guard),
                dropped,
            }),
        })
    });
}

/// The subscriber [`init`] installed, if a bridge called it: a bridge that routes the engine's
/// lines elsewhere (Python's `logging`) installs its own instead, and the engine then leaves level,
/// format and output to it.
fn installed() -> Option<&'static Installed> {
    INSTALLED.get().and_then(Option::as_ref)
}

pub fn set_level(level: LogLevel) {
    if let Some(installed) = installed() {
        let _ = installed.level.modify(|filter| *filter = to_filter(level));
    }
}

/// Switch format and/or output (`None` keeps the current one). The file is opened here, so a
/// path that cannot be written fails with a configuration error naming `log_output`, and
/// changes nothing.
pub fn configure(format: Option<LogFormat>, output: Option<LogOutput>) -> EngineResult<()> {
    let Some(installed) = installed() else {
        return Ok(());
    };
    let mut sink = installed.sink.lock().unwrap_or_else(|e| e.into_inner());
    let format = format.unwrap_or(sink.format);
    let output = output.unwrap_or_else(|| sink.output.clone());
    if format == sink.format && output == sink.output {
        return Ok(());
    }
    let (writer, guard) = open(&output).map_err(|e| match &output {
        LogOutput::File(path) => EngineError::config(format!(
            "log_output: cannot open {} for writing: {e}",
            path.display()
        )),
        _ => EngineError::config(format!("log_output: {e}")),
    })?;
    replace(installed, &mut sink, format, output, writer, guard);
    Ok(())
}

fn replace(
    installed: &Installed,
    sink: &mut Sink,
    format: LogFormat,
    output: LogOutput,
    writer: NonBlocking,
    guard: WorkerGuard,
) {
    let dropped = writer.error_counter();
    if installed
        .output
        .reload(layer(format, &output, writer))
        .is_err()
    {
        return;
    }
    DROPPED_BEFORE.fetch_add(sink.dropped.dropped_lines() as u64, Ordering::Relaxed);
    sink.format = format;
    sink.output = output;
    sink.dropped = dropped;
    // Dropping the old guard waits (about a second at most) for its queued lines to be written.
    drop(sink.guard.replace(guard));
}

/// Write every queued line out, waiting up to about a second. Blocks: never call it with the
/// GVL held.
pub fn flush() {
    let Some(installed) = installed() else {
        return;
    };
    let mut sink = installed.sink.lock().unwrap_or_else(|e| e.into_inner());
    // A writer drains only when its guard goes: put a fresh one in its place first.
    let output = sink.output.clone();
    match open(&output) {
        Ok((writer, guard)) => {
            let format = sink.format;
            replace(installed, &mut sink, format, output, writer, guard);
        }
        Err(_) => drop(sink.guard.take()),
    }
}

/// Lines dropped because the writer's queue was full, since the process started.
pub fn dropped_lines() -> u64 {
    let current = installed().map_or(0, |i| {
        let sink = i.sink.lock().unwrap_or_else(|e| e.into_inner());
        sink.dropped.dropped_lines() as u64
    });
    DROPPED_BEFORE.load(Ordering::Relaxed) + current + relay().dropped.load(Ordering::Relaxed)
}

/// Text fields: `name=value`, with Ruby's context spread out as fields of their own.
fn text_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    format::debug_fn(
        |w: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug| match field.name() {
            "message" => write!(w, "{value:?}"),
            RUBY_FIELDS => {
                let Ok(OrderedFields(fields)) = serde_json::from_str(&format!("{value:?}")) else {
                    return write!(w, "context={value:?}");
                };
                let mut first = true;
                for (key, value) in fields {
                    if !first {
                        w.write_char(' ')?;
                    }
                    first = false;
                    write!(w, "{key}={value}")?;
                }
                Ok(())
            }
            name => write!(w, "{name}={value:?}"),
        },
    )
    .delimited(" ")
}

/// One JSON object a line: timestamp, level, target, message, then every field as its own key.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        // Written key by key so that the four fixed keys come first, in this order.
        let mut line = vec![
            ("timestamp".to_owned(), Value::String(timestamp)),
            ("level".to_owned(), Value::String(meta.level().to_string())),
            ("target".to_owned(), Value::String(meta.target().to_owned())),
            (
                "message".to_owned(),
                Value::String(fields.message.unwrap_or_default()),
            ),
        ];
        for (key, value) in fields.fields {
            // A field never hides one of the four above.
            let key = if line.iter().take(4).any(|(fixed, _)| *fixed == key) {
                format!("field.{key}")
            } else {
                key
            };
            line.push((key, value));
        }
        writer.write_char('{')?;
        for (i, (key, value)) in line.iter().enumerate() {
            if i > 0 {
                writer.write_char(',')?;
            }
            write!(writer, "{}:{value}", Value::String(key.clone()))?;
        }
        writer.write_str("}\n")
    }
}

#[derive(Default)]
struct JsonFields {
    message: Option<String>,
    fields: Vec<(String, Value)>,
}

impl JsonFields {
    fn put(&mut self, field: &Field, value: Value) {
        self.fields.push((field.name().to_owned(), value));
    }
}

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = Some(text),
            RUBY_FIELDS => match serde_json::from_str(&text) {
                Ok(OrderedFields(fields)) => self.fields.extend(fields),
                _ => self.fields.push(("context".into(), Value::String(text))),
            },
            _ => self.put(field, Value::String(text)),
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_owned());
        } else {
            self.put(field, Value::String(value.to_owned()));
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
}

/// A JSON object's entries in the order written (`serde_json::Map` sorts them), so that Ruby's
/// context fields appear in the order the caller gave them.
struct OrderedFields(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for OrderedFields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = OrderedFields;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<OrderedFields, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(OrderedFields(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}
