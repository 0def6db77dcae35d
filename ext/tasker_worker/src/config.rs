//! Worker configuration: parsed from the loosely typed map Ruby hands over, validated
//! key by key so that every error names the key and the problem.

use crate::error::{EngineError, EngineResult};
use serde_json::{Map, Value};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Memory,
    Postgres,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeploymentMode {
    EventDriven,
    Polling,
    Hybrid,
}

impl DeploymentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EventDriven => "EventDriven",
            Self::Polling => "Polling",
            Self::Hybrid => "Hybrid",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "trace" => Self::Trace,
            "debug" => Self::Debug,
            "info" => Self::Info,
            "warn" => Self::Warn,
            "error" => Self::Error,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// `log_format`: how each line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `2025-01-01T12:00:00.123456Z  INFO target: message key=value`
    Text,
    /// One JSON object a line: timestamp, level, target, message and every field as its own key.
    Json,
}

/// `log_output`: where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOutput {
    Stderr,
    Stdout,
    /// Appended to (created if missing).
    File(PathBuf),
    /// `"rails"`: handed to the host language (`logging::take_relayed_lines`), whose own thread
    /// writes them to its logger (Rails.logger). Never written from an engine thread.
    Relay,
}

/// Every key `bootstrap_worker` accepts. Anything else is rejected by name.
pub const CONFIG_KEYS: &[&str] = &[
    "worker_id",
    "namespaces",
    "backend",
    "database_url",
    "deployment_mode",
    "concurrency",
    "templates",
    "log_level",
    "log_format",
    "log_output",
    "enable_web_api",
    "event_driven_enabled",
    "environment",
    "poll_interval",
    "shutdown_timeout",
    "task_retention",
    "task_index_retention",
    "database_pool_size",
    "finished_task_ttl",
    "claim_lease",
    "validate_handlers",
    "install_signal_handlers",
    "web_api_bind",
    "web_api_token",
    "web_api_actions",
];

/// Where the web API listens unless `web_api_bind` says otherwise: loopback only.
pub const DEFAULT_WEB_API_BIND: &str = "127.0.0.1:9393";

/// The HTTP endpoint (`enable_web_api: true`).
#[derive(Clone)]
pub struct WebApiConfig {
    pub bind: SocketAddr,
    /// When set, every request must carry `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// `web_api_actions`: the dashboard's cancel and retry (POST) routes answer.
    pub actions: bool,
}

impl std::fmt::Debug for WebApiConfig {
    // Never print the token (configs end up in logs and exception messages).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebApiConfig")
            .field("bind", &self.bind)
            .field("token", &self.token.as_ref().map(|_| "[set]"))
            .field("actions", &self.actions)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    /// `None`: every namespace that has a template.
    pub namespaces: Option<Vec<String>>,
    pub backend: BackendKind,
    pub database_url: Option<String>,
    pub deployment_mode: DeploymentMode,
    /// Number of Ruby handler threads; also sizes the dispatch buffer.
    pub concurrency: usize,
    pub templates: Vec<PathBuf>,
    pub log_level: Option<LogLevel>,
    /// `None`: unchanged (text unless an earlier bootstrap said otherwise).
    pub log_format: Option<LogFormat>,
    /// `None`: unchanged (stderr unless an earlier bootstrap said otherwise). A file is opened at
    /// bootstrap, which fails naming `log_output` if it cannot be written.
    pub log_output: Option<LogOutput>,
    pub event_driven_enabled: bool,
    pub environment: String,
    /// How often the postgres backend claims without a notification (Polling and Hybrid).
    pub poll_interval: Duration,
    /// How long a stop waits for in-flight steps before giving up on them.
    pub shutdown_timeout: Duration,
    /// Finished tasks kept for `task_status` (memory backend); older ones are forgotten.
    pub task_retention: usize,
    /// Beyond those, the final statuses of this many more (memory backend; see `MemoryBackend`).
    pub task_index_retention: usize,
    pub database_pool_size: u32,
    /// The postgres backend deletes finished tasks older than this.
    pub finished_task_ttl: Duration,
    /// How long a step claimed by a postgres worker stays its own without a renewal: the engine
    /// renews its claims every third of this, so another worker takes a step over only once its
    /// owner has stopped renewing (died, or lost the database) for this long.
    pub claim_lease: Duration,
    /// Whether `Worker::Bootstrap.start!` resolves every template's handler class before starting
    /// (the Ruby side does the check; the engine only validates the value).
    pub validate_handlers: bool,
    /// `None` unless `enable_web_api: true`.
    pub web_api: Option<WebApiConfig>,
    /// How a template's `handler.callable` must look: set by the bridge that runs the handlers
    /// (from `from_map`: any non-empty callable).
    pub callable_rule: crate::template::CallableRule,
}

impl WorkerConfig {
    /// Parse and validate. `env` looks up environment variables (injected so tests stay hermetic).
    pub fn from_map(
        map: &Map<String, Value>,
        env: impl Fn(&str) -> Option<String>,
    ) -> EngineResult<Self> {
        if let Some(unknown) = map.keys().find(|k| !CONFIG_KEYS.contains(&k.as_str())) {
            return Err(EngineError::config(format!(
                "unknown config key `{unknown}` (known keys: {})",
                CONFIG_KEYS.join(", ")
            )));
        }
        let get = |key: &str| map.get(key).filter(|v| !v.is_null());

        let worker_id = match get("worker_id") {
            Some(v) => non_empty_string("worker_id", v)?,
            None => format!("worker-{}", uuid::Uuid::new_v4()),
        };
        let namespaces = get("namespaces")
            .map(|v| string_list("namespaces", v))
            .transpose()?;
        let backend = match get("backend")
            .map(|v| string("backend", v))
            .transpose()?
            .as_deref()
        {
            None | Some("memory") => BackendKind::Memory,
            Some("postgres") => BackendKind::Postgres,
            Some(other) => return Err(bad_value("backend", other, "\"memory\" or \"postgres\"")),
        };
        let database_url = match get("database_url") {
            Some(v) => Some(non_empty_string("database_url", v)?),
            None => env("DATABASE_URL").filter(|s| !s.is_empty()),
        };
        let deployment_mode = match get("deployment_mode")
            .map(|v| string("deployment_mode", v))
            .transpose()?
            .as_deref()
        {
            None | Some("Hybrid") => DeploymentMode::Hybrid,
            Some("EventDriven") => DeploymentMode::EventDriven,
            Some("Polling") => DeploymentMode::Polling,
            Some(other) => {
                return Err(bad_value(
                    "deployment_mode",
                    other,
                    "\"Hybrid\", \"EventDriven\" or \"Polling\"",
                ))
            }
        };
        let concurrency = match get("concurrency") {
            Some(v) => integer_in("concurrency", v, 1, 1024)? as usize,
            None => 4,
        };
        let templates = match get("templates") {
            Some(v) => path_list("templates", v)?,
            None => env("TASKER_TEMPLATE_PATH")
                .map(|s| {
                    std::env::split_paths(&s)
                        .filter(|p| !p.as_os_str().is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        };
        let log_level = match get("log_level") {
            Some(v) => {
                let s = string("log_level", v)?;
                Some(LogLevel::parse(&s).ok_or_else(|| {
                    bad_value("log_level", &s, "trace, debug, info, warn or error")
                })?)
            }
            None => None,
        };
        let log_format = match get("log_format") {
            Some(v) => Some(match string("log_format", v)?.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => return Err(bad_value("log_format", other, "text or json")),
            }),
            None => None,
        };
        let log_output = match get("log_output") {
            Some(v) => Some(match non_empty_string("log_output", v)?.as_str() {
                "stderr" => LogOutput::Stderr,
                "stdout" => LogOutput::Stdout,
                // Not a file name: the contract reserves it for Rails.logger.
                "rails" => LogOutput::Relay,
                path => LogOutput::File(PathBuf::from(path)),
            }),
            None => None,
        };
        let web_api = web_api(
            get("enable_web_api"),
            get("web_api_bind"),
            get("web_api_token"),
            get("web_api_actions"),
        )?;
        let event_driven_enabled = match get("event_driven_enabled") {
            Some(v) => boolean("event_driven_enabled", v)?,
            None => deployment_mode != DeploymentMode::Polling,
        };
        if !event_driven_enabled && deployment_mode == DeploymentMode::EventDriven {
            return Err(EngineError::config(
                "event_driven_enabled: false contradicts deployment_mode: \"EventDriven\"",
            ));
        }
        if event_driven_enabled
            && deployment_mode == DeploymentMode::Polling
            && get("event_driven_enabled").is_some()
        {
            return Err(EngineError::config(
                "event_driven_enabled: true contradicts deployment_mode: \"Polling\"",
            ));
        }
        let environment = match get("environment") {
            Some(v) => non_empty_string("environment", v)?,
            // A bridge may add its framework's variables (RAILS_ENV...) by setting `environment`.
            None => env("TASKER_ENV")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "development".to_string()),
        };
        let poll_interval = match get("poll_interval") {
            Some(v) => seconds_in("poll_interval", v, 0.001, 3600.0)?,
            None => Duration::from_millis(500),
        };
        let shutdown_timeout = match get("shutdown_timeout") {
            Some(v) => seconds_in("shutdown_timeout", v, 0.0, 86_400.0)?,
            None => Duration::from_secs(30),
        };
        let task_retention = match get("task_retention") {
            Some(v) => integer_in("task_retention", v, 0, 100_000_000)? as usize,
            None => 10_000,
        };
        let task_index_retention = match get("task_index_retention") {
            Some(v) => integer_in("task_index_retention", v, 0, 100_000_000)? as usize,
            None => 500_000,
        };
        let database_pool_size = match get("database_pool_size") {
            Some(v) => integer_in("database_pool_size", v, 1, 1000)? as u32,
            None => 8,
        };

        let finished_task_ttl = match get("finished_task_ttl") {
            Some(v) => seconds_in("finished_task_ttl", v, 1.0, 315_360_000.0)?,
            None => Duration::from_secs(7 * 24 * 3600),
        };

        let claim_lease = match get("claim_lease") {
            Some(v) => seconds_in("claim_lease", v, 0.3, 3600.0)?,
            None => Duration::from_secs(30),
        };

        let validate_handlers = match get("validate_handlers") {
            Some(v) => boolean("validate_handlers", v)?,
            None => true,
        };
        // Read by `Worker::Bootstrap` (Ruby traps); only its type is checked here.
        if let Some(v) = get("install_signal_handlers") {
            boolean("install_signal_handlers", v)?;
        }

        if backend == BackendKind::Memory {
            if get("database_url").is_some() {
                return Err(EngineError::config(
                    "database_url is set but backend is \"memory\": add backend: \"postgres\" to use the database",
                ));
            }
            if deployment_mode != DeploymentMode::Hybrid {
                return Err(EngineError::config(format!(
                    "deployment_mode: {:?} applies to the postgres backend only (the memory backend always dispatches \
                     on events)",
                    deployment_mode.as_str()
                )));
            }
        }
        if backend == BackendKind::Postgres && database_url.is_none() {
            return Err(EngineError::config(
                "database_url: required with backend: \"postgres\" (or set DATABASE_URL)",
            ));
        }

        Ok(Self {
            worker_id,
            namespaces,
            backend,
            database_url: if backend == BackendKind::Postgres {
                database_url
            } else {
                None
            },
            deployment_mode,
            concurrency,
            templates,
            log_level,
            log_format,
            log_output,
            event_driven_enabled,
            environment,
            poll_interval,
            shutdown_timeout,
            task_retention,
            task_index_retention,
            database_pool_size,
            finished_task_ttl,
            claim_lease,
            validate_handlers,
            web_api,
            callable_rule: crate::template::any_callable,
        })
    }
}

fn web_api(
    enable: Option<&Value>,
    bind: Option<&Value>,
    token: Option<&Value>,
    actions: Option<&Value>,
) -> EngineResult<Option<WebApiConfig>> {
    let enabled = enable
        .map(|v| boolean("enable_web_api", v))
        .transpose()?
        .unwrap_or(false);
    let bind = bind
        .map(|v| socket_address("web_api_bind", v))
        .transpose()?;
    let token = token
        .map(|v| non_empty_string("web_api_token", v))
        .transpose()?;
    let actions = actions.map(|v| boolean("web_api_actions", v)).transpose()?;
    if !enabled {
        // A bind or token without the switch is a half-done configuration: say so rather than
        // leave the operator wondering why nothing listens.
        if let Some(key) = [
            ("web_api_bind", bind.is_some()),
            ("web_api_token", token.is_some()),
            ("web_api_actions", actions == Some(true)),
        ]
        .into_iter()
        .find_map(|(key, set)| set.then_some(key))
        {
            return Err(EngineError::config(format!(
                "{key} is set but enable_web_api is not true: add enable_web_api: true to start the web API"
            )));
        }
        return Ok(None);
    }
    let bind = bind.unwrap_or_else(|| DEFAULT_WEB_API_BIND.parse().expect("a valid address"));
    if token.is_none() && !bind.ip().is_loopback() {
        return Err(EngineError::config(format!(
            "web_api_bind: {bind} is reachable from other hosts, and the web API has no web_api_token: set \
             web_api_token (clients then send Authorization: Bearer <token>) or bind to a loopback address \
             such as {DEFAULT_WEB_API_BIND}"
        )));
    }
    Ok(Some(WebApiConfig {
        bind,
        token,
        actions: actions.unwrap_or(false),
    }))
}

/// `host:port` with an IP address (or `localhost`) and a port; `[::1]:9393` for IPv6. No name
/// resolution: what a name resolves to can change, and the loopback check must hold.
fn socket_address(key: &str, v: &Value) -> EngineResult<SocketAddr> {
    let s = non_empty_string(key, v)?;
    let localhost = s
        .strip_prefix("localhost:")
        .and_then(|port| port.parse::<u16>().ok())
        .map(|port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    localhost.or_else(|| s.parse().ok()).ok_or_else(|| {
        bad_value(
            key,
            &s,
            "host:port with an IP address, e.g. \"127.0.0.1:9393\"",
        )
    })
}

fn bad_value(key: &str, got: &str, expected: &str) -> EngineError {
    EngineError::config(format!(
        "{key}: invalid value {got:?} (expected {expected})"
    ))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "nil",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "hash",
    }
}

fn string(key: &str, v: &Value) -> EngineResult<String> {
    v.as_str().map(str::to_owned).ok_or_else(|| {
        EngineError::config(format!("{key}: expected a string, got a {}", type_name(v)))
    })
}

fn non_empty_string(key: &str, v: &Value) -> EngineResult<String> {
    let s = string(key, v)?;
    if s.trim().is_empty() {
        return Err(EngineError::config(format!("{key}: must not be empty")));
    }
    Ok(s)
}

fn boolean(key: &str, v: &Value) -> EngineResult<bool> {
    v.as_bool().ok_or_else(|| {
        EngineError::config(format!(
            "{key}: expected true or false, got a {}",
            type_name(v)
        ))
    })
}

fn integer_in(key: &str, v: &Value, min: i64, max: i64) -> EngineResult<i64> {
    let n = v
        .as_i64()
        .ok_or_else(|| EngineError::config(format!("{key}: expected an integer, got {v}")))?;
    if n < min || n > max {
        return Err(EngineError::config(format!(
            "{key}: {n} is out of range ({min}..={max})"
        )));
    }
    Ok(n)
}

fn seconds_in(key: &str, v: &Value, min: f64, max: f64) -> EngineResult<Duration> {
    let n = v.as_f64().ok_or_else(|| {
        EngineError::config(format!("{key}: expected a number of seconds, got {v}"))
    })?;
    if !(min..=max).contains(&n) {
        return Err(EngineError::config(format!(
            "{key}: {n} seconds is out of range ({min}..={max})"
        )));
    }
    Ok(Duration::from_secs_f64(n))
}

fn string_list(key: &str, v: &Value) -> EngineResult<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|item| non_empty_string(key, item))
            .collect(),
        other => Err(EngineError::config(format!(
            "{key}: expected a string or an array of strings, got a {}",
            type_name(other)
        ))),
    }
}

fn path_list(key: &str, v: &Value) -> EngineResult<Vec<PathBuf>> {
    Ok(string_list(key, v)?
        .into_iter()
        .map(PathBuf::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> EngineResult<WorkerConfig> {
        WorkerConfig::from_map(v.as_object().unwrap(), |_| None)
    }

    #[test]
    fn defaults() {
        let c = parse(json!({})).unwrap();
        assert_eq!(c.backend, BackendKind::Memory);
        assert_eq!(c.deployment_mode, DeploymentMode::Hybrid);
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.environment, "development");
        assert!(c.worker_id.starts_with("worker-"));
        assert!(c.validate_handlers);
        assert_eq!(c.claim_lease, Duration::from_secs(30));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(json!({"colour": "red"})).unwrap_err().to_string();
        assert!(err.contains("unknown config key `colour`"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (cfg, needle) in [
            (json!({"log_level": "loud"}), "log_level"),
            (json!({"log_format": "xml"}), "log_format"),
            (json!({"log_format": 1}), "log_format"),
            (json!({"log_output": ""}), "log_output"),
            (json!({"log_output": 5}), "log_output"),
            (json!({"log_output": false}), "log_output"),
            (json!({"concurrency": 0}), "concurrency"),
            (json!({"concurrency": "4"}), "concurrency"),
            (json!({"backend": "redis"}), "backend"),
            (json!({"deployment_mode": "Sometimes"}), "deployment_mode"),
            (json!({"backend": "postgres"}), "database_url"),
            (json!({"enable_web_api": "yes"}), "enable_web_api"),
            (
                json!({"enable_web_api": true, "web_api_bind": "example.com:80"}),
                "web_api_bind",
            ),
            (
                json!({"enable_web_api": true, "web_api_bind": "127.0.0.1"}),
                "web_api_bind",
            ),
            (
                json!({"enable_web_api": true, "web_api_bind": "0.0.0.0:9393"}),
                "web_api_bind",
            ),
            (
                json!({"enable_web_api": true, "web_api_token": ""}),
                "web_api_token",
            ),
            (json!({"web_api_bind": "127.0.0.1:9393"}), "web_api_bind"),
            (json!({"web_api_token": "secret"}), "web_api_token"),
            (json!({"validate_handlers": "no"}), "validate_handlers"),
            (json!({"validate_handlers": 0}), "validate_handlers"),
            (json!({"claim_lease": 0.1}), "claim_lease"),
        ] {
            let err = parse(cfg.clone()).unwrap_err();
            assert!(matches!(err, EngineError::Configuration(_)));
            assert!(err.to_string().starts_with(needle), "{cfg}: {err}");
        }
    }

    #[test]
    fn log_output_rails_is_relayed_to_the_host_not_a_file_named_rails() {
        let config = parse(json!({"log_output": "rails"})).unwrap();
        assert_eq!(config.log_output, Some(LogOutput::Relay));
    }

    #[test]
    fn web_api_defaults_to_loopback_and_needs_a_token_beyond_it() {
        assert!(parse(json!({})).unwrap().web_api.is_none());
        let web = parse(json!({"enable_web_api": true}))
            .unwrap()
            .web_api
            .unwrap();
        assert_eq!(web.bind.to_string(), DEFAULT_WEB_API_BIND);
        assert!(web.token.is_none());
        let web = parse(json!({"enable_web_api": true, "web_api_bind": "localhost:0"}))
            .unwrap()
            .web_api
            .unwrap();
        assert_eq!(web.bind.to_string(), "127.0.0.1:0");
        let err = parse(json!({"enable_web_api": true, "web_api_bind": "0.0.0.0:9393"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("web_api_token"), "{err}");
        let web = parse(
            json!({"enable_web_api": true, "web_api_bind": "[::]:9393", "web_api_token": "s3cret"}),
        )
        .unwrap()
        .web_api
        .unwrap();
        assert_eq!(web.token.as_deref(), Some("s3cret"));
        assert!(
            !format!("{web:?}").contains("s3cret"),
            "Debug hides the token"
        );
    }

    #[test]
    fn validate_handlers_is_a_boolean() {
        assert!(
            !parse(json!({"validate_handlers": false}))
                .unwrap()
                .validate_handlers
        );
        assert!(
            parse(json!({"validate_handlers": true}))
                .unwrap()
                .validate_handlers
        );
        assert!(
            parse(json!({"validate_handlers": null}))
                .unwrap()
                .validate_handlers
        );
    }

    #[test]
    fn environment_falls_back_to_tasker_env_only() {
        let c = WorkerConfig::from_map(&Map::new(), |k| Some(format!("from-{k}"))).unwrap();
        assert_eq!(c.environment, "from-TASKER_ENV");
        // Framework variables are the bridges' business (the Ruby one reads RAILS_ENV, RACK_ENV).
        let c =
            WorkerConfig::from_map(&Map::new(), |k| (k == "RACK_ENV").then(|| "staging".into()))
                .unwrap();
        assert_eq!(c.environment, "development");
    }
}
