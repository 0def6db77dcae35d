//! Task templates: YAML files describing a DAG of steps, validated at load so that a bad
//! template fails the bootstrap with the file, the step and the problem named.

use crate::error::{EngineError, EngineResult};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    Exponential,
    Linear,
    None,
}

impl Backoff {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exponential => "exponential",
            Self::Linear => "linear",
            Self::None => "none",
        }
    }
}

/// What happens when an attempt outlives `timeout_seconds` while its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// Raise `TaskerCore::StepTimeoutError` in the handler's thread (the default).
    Raise,
    /// Leave the handler alone: the attempt is recorded as timed out when it returns, and its
    /// result is discarded (for handlers that must not be interrupted half-way).
    Wait,
}

impl OnTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raise => "raise",
            Self::Wait => "wait",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub retryable: bool,
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub backoff_base_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retryable: true,
            max_attempts: 3,
            backoff: Backoff::Exponential,
            backoff_base_ms: 100,
            max_backoff_ms: 30_000,
        }
    }
}

impl RetryPolicy {
    /// Delay before the attempt after `failed_attempt` (1-based), capped at `max_backoff_ms`.
    pub fn delay_after(&self, failed_attempt: u32) -> Duration {
        let ms = match self.backoff {
            Backoff::None => 0,
            Backoff::Linear => self.backoff_base_ms.saturating_mul(failed_attempt as u64),
            Backoff::Exponential => {
                let shift = failed_attempt.saturating_sub(1).min(63);
                self.backoff_base_ms
                    .saturating_mul(1u64.checked_shl(shift).unwrap_or(u64::MAX))
            }
        };
        Duration::from_millis(ms.min(self.max_backoff_ms))
    }
}

#[derive(Debug)]
pub struct StepDefinition {
    pub name: Arc<str>,
    /// The namespace of the workers that run this step: the step's `namespace:`, or its
    /// template's. A polyglot workflow gives the steps another language's workers run a
    /// namespace of their own (see docs/templates.md).
    pub namespace: String,
    pub callable: String,
    /// Always a JSON object.
    pub initialization: Value,
    pub dependencies: Vec<String>,
    pub retry: RetryPolicy,
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
}

#[derive(Debug)]
pub struct TaskTemplate {
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub source: PathBuf,
    /// The YAML it was parsed from (the postgres backend stores it for other processes).
    pub yaml: String,
    pub steps: Vec<Arc<StepDefinition>>,
    /// For each step, the indices of the steps it depends on.
    pub dependencies: Vec<Vec<usize>>,
    /// For each step, the indices of the steps that depend on it.
    pub dependents: Vec<Vec<usize>>,
}

impl TaskTemplate {
    pub fn key(&self) -> TemplateKey {
        TemplateKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            version: self.version.clone(),
        }
    }

    /// Parse and validate one template; `source` only labels error messages. Any non-empty
    /// `handler.callable` is accepted here: what a callable looks like is the business of the
    /// bridge whose handlers run it (a Ruby constant path, a Python dotted path), checked by
    /// [`Self::check_callables`] for the steps a worker runs.
    pub fn from_yaml(yaml: &str, source: &Path) -> EngineResult<Self> {
        Self::from_yaml_checked(yaml, source, any_callable)
    }

    /// [`TaskTemplate::from_yaml`], with every step's `handler.callable` checked by `rule`.
    pub fn from_yaml_checked(yaml: &str, source: &Path, rule: CallableRule) -> EngineResult<Self> {
        let file = source.display();
        let raw: RawTemplate = serde_norway::from_str(yaml).map_err(|e| {
            EngineError::config(format!(
                "template {file}: {}",
                name_step_in_error(yaml, &e.to_string())
            ))
        })?;
        let fail = |message: String| EngineError::config(format!("template {file}: {message}"));

        for (field, value) in [
            ("namespace", &raw.namespace),
            ("name", &raw.name),
            ("version", &raw.version),
        ] {
            if value.trim().is_empty() {
                return Err(fail(format!("`{field}` must not be empty")));
            }
        }
        if raw.steps.is_empty() {
            return Err(fail("`steps` must list at least one step".into()));
        }

        let mut index_of: HashMap<&str, usize> = HashMap::new();
        for (i, step) in raw.steps.iter().enumerate() {
            if step.name.trim().is_empty() {
                return Err(fail(format!("step #{} has an empty name", i + 1)));
            }
            if index_of.insert(step.name.as_str(), i).is_some() {
                return Err(fail(format!("duplicate step name `{}`", step.name)));
            }
        }

        let mut steps = Vec::with_capacity(raw.steps.len());
        let mut dependencies = Vec::with_capacity(raw.steps.len());
        for step in &raw.steps {
            let in_step = |problem: String| fail(format!("step `{}`: {problem}", step.name));
            let callable = step.handler.callable.clone().unwrap_or_default();
            if callable.trim().is_empty() {
                return Err(in_step("handler.callable is missing".into()));
            }
            if let Err(expected) = rule(&callable) {
                return Err(in_step(format!("handler.callable {callable:?} {expected}")));
            }
            let namespace = match &step.namespace {
                None => raw.namespace.clone(),
                Some(n) if !n.trim().is_empty() => n.clone(),
                Some(_) => return Err(in_step("`namespace` must not be empty".into())),
            };
            let initialization = match &step.handler.initialization {
                None | Some(Value::Null) => Value::Object(Default::default()),
                Some(v @ Value::Object(_)) => v.clone(),
                Some(_) => return Err(in_step("handler.initialization must be a mapping".into())),
            };
            let retry = step
                .retry
                .as_ref()
                .map(|r| r.validate())
                .transpose()
                .map_err(in_step)?
                .unwrap_or_default();
            let timeout = match step.timeout_seconds {
                None => Duration::from_secs(30),
                Some(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => Duration::from_secs_f64(t),
                Some(t) => {
                    return Err(in_step(format!(
                        "timeout_seconds must be in (0, 86400], got {t}"
                    )))
                }
            };
            let on_timeout = match step.on_timeout.as_deref() {
                None | Some("raise") => OnTimeout::Raise,
                Some("wait") => OnTimeout::Wait,
                Some(other) => {
                    return Err(in_step(format!(
                        "on_timeout must be \"raise\" or \"wait\", got {other:?}"
                    )))
                }
            };
            let mut deps = Vec::with_capacity(step.dependencies.len());
            for dep in &step.dependencies {
                if dep == &step.name {
                    return Err(in_step("depends on itself".into()));
                }
                match index_of.get(dep.as_str()) {
                    Some(&j) if !deps.contains(&j) => deps.push(j),
                    Some(_) => return Err(in_step(format!("dependency `{dep}` is listed twice"))),
                    None => return Err(in_step(format!("unknown dependency `{dep}`"))),
                }
            }
            dependencies.push(deps);
            steps.push(Arc::new(StepDefinition {
                name: Arc::from(step.name.as_str()),
                namespace,
                callable,
                initialization,
                dependencies: step.dependencies.clone(),
                retry,
                timeout,
                on_timeout,
            }));
        }

        let mut dependents = vec![Vec::new(); steps.len()];
        for (i, deps) in dependencies.iter().enumerate() {
            for &d in deps {
                dependents[d].push(i);
            }
        }
        if let Some(cycle) = find_cycle(&dependencies) {
            let names: Vec<&str> = cycle.iter().map(|&i| steps[i].name.as_ref()).collect();
            return Err(fail(format!("dependency cycle: {}", names.join(" -> "))));
        }

        Ok(Self {
            namespace: raw.namespace,
            name: raw.name,
            version: raw.version,
            source: source.to_path_buf(),
            yaml: yaml.to_string(),
            steps,
            dependencies,
            dependents,
        })
    }

    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| &*s.name == name)
    }

    /// Check the callables of the steps a worker of `namespaces` runs with its bridge's `rule`
    /// (the other steps belong to other workers, maybe in another language).
    pub fn check_callables(&self, namespaces: &[String], rule: CallableRule) -> EngineResult<()> {
        for step in self
            .steps
            .iter()
            .filter(|s| namespaces.contains(&s.namespace))
        {
            if let Err(expected) = rule(&step.callable) {
                // A step with a namespace of its own is most likely another language's: say how
                // to leave it to those workers.
                let hint = if step.namespace != self.namespace {
                    format!(
                        "; this worker runs its namespace {:?}: if other workers (another language's) run it, \
                         leave it out of this worker's namespaces",
                        step.namespace
                    )
                } else {
                    String::new()
                };
                return Err(EngineError::config(format!(
                    "template {}: step `{}`: handler.callable {:?} {expected}{hint}",
                    self.source.display(),
                    step.name,
                    step.callable
                )));
            }
        }
        Ok(())
    }

    /// Steps no worker of `namespaces` runs (each with its namespace): in one process (the
    /// memory backend) a task of this template would wait for them forever.
    pub fn steps_outside<'a>(
        &'a self,
        namespaces: &'a [String],
    ) -> impl Iterator<Item = &'a StepDefinition> + 'a {
        self.steps
            .iter()
            .map(|s| &**s)
            .filter(|s| !namespaces.contains(&s.namespace))
    }
}

/// serde names a step by its index (`steps[1].retry: unknown field ...`): add its name, as
/// every other template error does (`step `ship`: steps[1].retry: unknown field ...`).
fn name_step_in_error(yaml: &str, message: &str) -> String {
    let index = message
        .strip_prefix("steps[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(index, _)| index.parse::<usize>().ok());
    let name = index.and_then(|index| {
        let doc: serde_norway::Value = serde_norway::from_str(yaml).ok()?;
        doc.get("steps")?
            .get(index)?
            .get("name")?
            .as_str()
            .map(str::to_owned)
    });
    match name {
        Some(name) => format!("step `{name}`: {message}"),
        None => message.to_string(),
    }
}

/// Checks one `handler.callable` (already known to be non-empty): `Err` says what was expected,
/// as the end of a sentence starting with the callable ("is not a Ruby class name (...)").
pub type CallableRule = fn(&str) -> Result<(), String>;

/// The engine's own rule: any non-empty callable (the bridge that runs it knows better).
pub fn any_callable(_: &str) -> Result<(), String> {
    Ok(())
}

/// Depth-first search; returns one cycle as a closed path (first == last) if any.
fn find_cycle(dependencies: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        n: usize,
        deps: &[Vec<usize>],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        marks[n] = Mark::Open;
        path.push(n);
        for &d in &deps[n] {
            match marks[d] {
                Mark::Open => {
                    let start = path.iter().position(|&p| p == d).unwrap_or(0);
                    let mut cycle: Vec<usize> = path[start..].to_vec();
                    cycle.push(d);
                    // Report in execution order: dependency first.
                    cycle.reverse();
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(d, deps, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[n] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; dependencies.len()];
    let mut path = Vec::new();
    (0..dependencies.len()).find_map(|n| {
        if marks[n] == Mark::New {
            visit(n, dependencies, &mut marks, &mut path)
        } else {
            None
        }
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TemplateKey {
    pub namespace: String,
    pub name: String,
    pub version: String,
}

impl std::fmt::Display for TemplateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.namespace, self.name, self.version)
    }
}

/// Where a template names a handler class: one step of one template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerReference {
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub step: String,
    pub callable: String,
}

/// All templates a worker knows, immutable after bootstrap (shared without locks).
#[derive(Debug, Default)]
pub struct TemplateRegistry {
    templates: HashMap<TemplateKey, Arc<TaskTemplate>>,
}

impl TemplateRegistry {
    /// Load every `*.yml`/`*.yaml` under each path (directories recursively, in name order).
    /// Callables are checked later, for the steps a worker runs ([`Self::check_callables`]).
    pub fn load(paths: &[PathBuf]) -> EngineResult<Self> {
        let mut registry = Self::default();
        for path in paths {
            for file in yaml_files(path)? {
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    EngineError::config(format!("templates: cannot read {}: {e}", file.display()))
                })?;
                registry.insert(TaskTemplate::from_yaml(&text, &file)?)?;
            }
        }
        Ok(registry)
    }

    /// Check with the bridge's `rule` the callable of every step a worker of `namespaces` runs,
    /// in a stable order (the first bad one by template key, then step order).
    pub fn check_callables(&self, namespaces: &[String], rule: CallableRule) -> EngineResult<()> {
        let mut templates: Vec<&Arc<TaskTemplate>> = self.templates.values().collect();
        templates.sort_by_key(|t| t.key());
        templates
            .into_iter()
            .try_for_each(|t| t.check_callables(namespaces, rule))
    }

    pub fn insert(&mut self, template: TaskTemplate) -> EngineResult<()> {
        let key = template.key();
        if let Some(existing) = self.templates.get(&key) {
            return Err(EngineError::config(format!(
                "template {}: {key} is already defined in {}",
                template.source.display(),
                existing.source.display()
            )));
        }
        self.templates.insert(key, Arc::new(template));
        Ok(())
    }

    pub fn get(&self, namespace: &str, name: &str, version: &str) -> Option<&Arc<TaskTemplate>> {
        // Building a key allocates; templates are few and this is off the per-step path.
        self.templates.get(&TemplateKey {
            namespace: namespace.into(),
            name: name.into(),
            version: version.into(),
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<TaskTemplate>> {
        self.templates.values()
    }

    pub fn len(&self) -> usize {
        self.templates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// Sorted, de-duplicated namespaces of all templates and of their steps.
    pub fn namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .templates
            .values()
            .flat_map(|t| {
                std::iter::once(t.namespace.clone())
                    .chain(t.steps.iter().map(|s| s.namespace.clone()))
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The handler of every step a worker of `namespaces` runs (a step runs in its own
    /// namespace, by default its template's), in a stable order (namespace, name, version, then
    /// the step's place in its template), for checking them before a start.
    pub fn handlers_in(&self, namespaces: &[String]) -> Vec<HandlerReference> {
        let mut templates: Vec<&Arc<TaskTemplate>> = self.templates.values().collect();
        templates.sort_by(|a, b| {
            (&a.namespace, &a.name, &a.version).cmp(&(&b.namespace, &b.name, &b.version))
        });
        templates
            .into_iter()
            .flat_map(|template| {
                template
                    .steps
                    .iter()
                    .filter(|step| namespaces.contains(&step.namespace))
                    .map(move |step| HandlerReference {
                        namespace: template.namespace.clone(),
                        name: template.name.clone(),
                        version: template.version.clone(),
                        step: step.name.to_string(),
                        callable: step.callable.clone(),
                    })
            })
            .collect()
    }

    pub fn describe_known(&self) -> String {
        let mut keys: Vec<String> = self.templates.keys().map(|k| k.to_string()).collect();
        keys.sort();
        if keys.is_empty() {
            "none loaded: pass templates: (a directory or YAML files) or set TASKER_TEMPLATE_PATH"
                .into()
        } else {
            keys.join(", ")
        }
    }
}

fn yaml_files(path: &Path) -> EngineResult<Vec<PathBuf>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| EngineError::config(format!("templates: {}: {e}", path.display())))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            EngineError::config(format!("templates: cannot list {}: {e}", dir.display()))
        })?;
        for entry in entries {
            let entry = entry
                .map_err(|e| EngineError::config(format!("templates: {}: {e}", dir.display())))?;
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")) {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    namespace: String,
    name: String,
    #[serde(deserialize_with = "scalar_string")]
    version: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    dependencies: Vec<String>,
    handler: RawHandler,
    #[serde(default)]
    retry: Option<RawRetry>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
    #[serde(default)]
    on_timeout: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    #[serde(default)]
    callable: Option<String>,
    #[serde(default)]
    initialization: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    retryable: Option<bool>,
    #[serde(default)]
    max_attempts: Option<i64>,
    #[serde(default)]
    backoff: Option<String>,
    #[serde(default)]
    backoff_base_ms: Option<i64>,
    #[serde(default)]
    max_backoff_ms: Option<i64>,
}

impl RawRetry {
    fn validate(&self) -> Result<RetryPolicy, String> {
        let d = RetryPolicy::default();
        let max_attempts = match self.max_attempts {
            None => d.max_attempts,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(n) => {
                return Err(format!(
                    "retry.max_attempts must be between 1 and 1000, got {n}"
                ))
            }
        };
        let backoff = match self.backoff.as_deref() {
            None | Some("exponential") => Backoff::Exponential,
            Some("linear") => Backoff::Linear,
            Some("none") => Backoff::None,
            Some(other) => {
                return Err(format!(
                    "retry.backoff {other:?} is not exponential, linear or none"
                ))
            }
        };
        let ms = |field: &str, value: Option<i64>, default: u64| match value {
            None => Ok(default),
            Some(n) if (0..=86_400_000).contains(&n) => Ok(n as u64),
            Some(n) => Err(format!(
                "retry.{field} must be between 0 and 86400000, got {n}"
            )),
        };
        let backoff_base_ms = ms("backoff_base_ms", self.backoff_base_ms, d.backoff_base_ms)?;
        let max_backoff_ms = ms("max_backoff_ms", self.max_backoff_ms, d.max_backoff_ms)?;
        if max_backoff_ms < backoff_base_ms {
            return Err(format!(
                "retry.max_backoff_ms ({max_backoff_ms}) is smaller than retry.backoff_base_ms ({backoff_base_ms})"
            ));
        }
        Ok(RetryPolicy {
            retryable: self.retryable.unwrap_or(true),
            max_attempts,
            backoff,
            backoff_base_ms,
            max_backoff_ms,
        })
    }
}

/// `version: 1.0.0` is a YAML string, but `version: 1` or `1.5` are numbers: accept them as written.
fn scalar_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a version string, got {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> EngineResult<TaskTemplate> {
        TaskTemplate::from_yaml(yaml, Path::new("t.yml"))
    }

    const DIAMOND: &str = r#"
namespace: demo
name: diamond
version: 1.0.0
steps:
  - name: a
    handler: { callable: Demo::A, initialization: { strict: true } }
    retry: { retryable: true, max_attempts: 5, backoff: linear, backoff_base_ms: 10, max_backoff_ms: 35 }
    timeout_seconds: 2
  - { name: b, dependencies: [a], handler: { callable: Demo::B } }
  - { name: c, dependencies: [a], handler: { callable: Demo::C } }
  - { name: d, dependencies: [b, c], handler: { callable: Demo::D } }
"#;

    #[test]
    fn serde_errors_name_the_step() {
        let e = parse("namespace: n\nname: x\nversion: 1\nsteps:\n  - { name: a, handler: { callable: A } }\n  - { name: b, retries: 3, handler: { callable: B } }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("template t.yml: step `b`: steps[1]: unknown field `retries`"),
            "{e}"
        );
        let e = parse("namespace: n\nname: x\nversion: 1\nsteps:\n  - { name: a, handler: { callable: A }, retry: { max_attempts: x } }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("template t.yml: step `a`: steps[0].retry.max_attempts: invalid type"),
            "{e}"
        );
        let e = parse("namespace: n\nname: x\nversion: 1\ncolour: red\nsteps: []\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("template t.yml: unknown field `colour`"),
            "{e}"
        );
    }

    #[test]
    fn parses_a_diamond() {
        let t = parse(DIAMOND).unwrap();
        assert_eq!(t.steps.len(), 4);
        assert_eq!(t.dependencies[3], vec![1, 2]);
        assert_eq!(t.dependents[0], vec![1, 2]);
        assert_eq!(t.steps[0].retry.max_attempts, 5);
        assert_eq!(t.steps[0].timeout, Duration::from_secs(2));
        assert_eq!(t.steps[0].initialization["strict"], Value::Bool(true));
        assert_eq!(t.steps[1].retry, RetryPolicy::default());
        assert_eq!(t.steps[1].timeout, Duration::from_secs(30));
    }

    #[test]
    fn backoff_delays() {
        let t = parse(DIAMOND).unwrap();
        let linear = &t.steps[0].retry;
        assert_eq!(linear.delay_after(1), Duration::from_millis(10));
        assert_eq!(linear.delay_after(3), Duration::from_millis(30));
        assert_eq!(linear.delay_after(4), Duration::from_millis(35));
        let exp = RetryPolicy::default();
        assert_eq!(exp.delay_after(1), Duration::from_millis(100));
        assert_eq!(exp.delay_after(3), Duration::from_millis(400));
        assert_eq!(exp.delay_after(200), Duration::from_millis(30_000));
        let none = RetryPolicy {
            backoff: Backoff::None,
            ..RetryPolicy::default()
        };
        assert_eq!(none.delay_after(2), Duration::ZERO);
    }

    fn err(yaml: &str) -> String {
        parse(yaml).unwrap_err().to_string()
    }

    #[test]
    fn rejects_bad_templates_naming_file_step_and_problem() {
        let head = "namespace: n\nname: x\nversion: 1.0.0\nsteps:\n";
        let cases = [
            ("  - { name: a, dependencies: [b], handler: { callable: A } }\n  - { name: b, dependencies: [a], handler: { callable: B } }\n", "dependency cycle: a -> b -> a"),
            ("  - { name: a, dependencies: [zzz], handler: { callable: A } }\n", "step `a`: unknown dependency `zzz`"),
            ("  - { name: a, handler: { callable: A } }\n  - { name: a, handler: { callable: B } }\n", "duplicate step name `a`"),
            ("  - { name: a, handler: { initialization: {} } }\n", "step `a`: handler.callable is missing"),
            ("  - { name: a, handler: { callable: A }, retry: { max_attempts: 0 } }\n", "step `a`: retry.max_attempts"),
            ("  - { name: a, handler: { callable: A }, retry: { backoff: sometimes } }\n", "retry.backoff \"sometimes\""),
            ("  - { name: a, handler: { callable: A }, retry: { backoff_base_ms: 50, max_backoff_ms: 10 } }\n", "max_backoff_ms (10)"),
            ("  - { name: a, handler: { callable: A }, timeout_seconds: 0 }\n", "timeout_seconds"),
            ("  - { name: a, handler: { callable: A }, dependecies: [] }\n", "unknown field `dependecies`"),
            ("  - { name: a, dependencies: [a], handler: { callable: A } }\n", "depends on itself"),
        ];
        for (steps, needle) in cases {
            let e = err(&format!("{head}{steps}"));
            assert!(e.starts_with("template t.yml: "), "{e}");
            assert!(e.contains(needle), "expected {needle:?} in {e:?}");
        }
        assert!(err("namespace: n\nname: x\nversion: 1\nsteps: []\n").contains("at least one step"));
    }

    #[test]
    fn the_bridge_rule_checks_callables_and_names_the_step() {
        fn dotted(callable: &str) -> Result<(), String> {
            if callable.contains('.') {
                Ok(())
            } else {
                Err("is not a dotted path".into())
            }
        }
        let yaml = "namespace: n\nname: x\nversion: 1\nsteps:\n  - { name: a, handler: { callable: 'not a class' } }\n";
        let e = TaskTemplate::from_yaml_checked(yaml, Path::new("t.yml"), dotted)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "template t.yml: step `a`: handler.callable \"not a class\" is not a dotted path"
        );
        // The engine alone accepts any non-empty callable.
        assert!(parse(yaml).is_ok());
    }

    #[test]
    fn longer_cycle_is_reported_in_order() {
        let e = err("namespace: n\nname: x\nversion: 1\nsteps:\n  - { name: root, handler: { callable: R } }\n  - { name: a, dependencies: [root, c], handler: { callable: A } }\n  - { name: b, dependencies: [a], handler: { callable: B } }\n  - { name: c, dependencies: [b], handler: { callable: C } }\n");
        assert!(e.contains("dependency cycle:"), "{e}");
        for n in ["a", "b", "c"] {
            assert!(e.contains(n));
        }
        assert!(!e.contains("root"), "{e}");
    }

    #[test]
    fn handlers_in_lists_the_steps_of_the_given_namespaces_only() {
        let mut reg = TemplateRegistry::default();
        reg.insert(parse(DIAMOND).unwrap()).unwrap();
        let other = "namespace: other\nname: one\nversion: 2\nsteps:\n  - { name: only, handler: { callable: Other::Only } }\n";
        reg.insert(parse(other).unwrap()).unwrap();

        let demo = reg.handlers_in(&["demo".to_string()]);
        let listed: Vec<(&str, &str)> = demo
            .iter()
            .map(|h| (h.step.as_str(), h.callable.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                ("a", "Demo::A"),
                ("b", "Demo::B"),
                ("c", "Demo::C"),
                ("d", "Demo::D")
            ]
        );
        assert_eq!(
            (
                demo[0].namespace.as_str(),
                demo[0].name.as_str(),
                demo[0].version.as_str()
            ),
            ("demo", "diamond", "1.0.0")
        );

        let both = reg.handlers_in(&["other".to_string(), "demo".to_string()]);
        assert_eq!(both.len(), 5);
        assert_eq!(both.last().unwrap().callable, "Other::Only");
        assert!(reg.handlers_in(&["nobody".to_string()]).is_empty());
    }

    const POLYGLOT: &str = "namespace: orders\nname: score\nversion: 1\nsteps:\n  - { name: fetch, handler: { callable: Orders::Fetch } }\n  - { name: score, namespace: ml, dependencies: [fetch], handler: { callable: ml.steps.Score } }\n  - { name: ship, dependencies: [score], handler: { callable: Orders::Ship } }\n";

    #[test]
    fn a_step_runs_in_its_own_namespace_or_its_templates() {
        let template = parse(POLYGLOT).unwrap();
        let namespaces: Vec<&str> = template
            .steps
            .iter()
            .map(|s| s.namespace.as_str())
            .collect();
        assert_eq!(namespaces, ["orders", "ml", "orders"]);
        let e = err("namespace: n\nname: x\nversion: 1\nsteps:\n  - { name: a, namespace: ' ', handler: { callable: A } }\n");
        assert!(e.contains("step `a`: `namespace` must not be empty"), "{e}");

        let mut reg = TemplateRegistry::default();
        reg.insert(template).unwrap();
        assert_eq!(reg.namespaces(), ["ml", "orders"]);
        let steps = |ns: &str| -> Vec<String> {
            reg.handlers_in(&[ns.to_string()])
                .into_iter()
                .map(|h| h.step)
                .collect()
        };
        assert_eq!(steps("orders"), ["fetch", "ship"]);
        assert_eq!(steps("ml"), ["score"]);
    }

    #[test]
    fn the_bridge_rule_checks_only_the_steps_its_worker_runs() {
        fn ruby(callable: &str) -> Result<(), String> {
            if callable.contains('.') {
                Err("is not a Ruby class name".into())
            } else {
                Ok(())
            }
        }
        let mut reg = TemplateRegistry::default();
        reg.insert(parse(POLYGLOT).unwrap()).unwrap();
        // The Ruby worker runs `orders`: the Python step is not its business.
        reg.check_callables(&["orders".to_string()], ruby).unwrap();
        // A Ruby worker that also claimed `ml` could not run `score`, and says so.
        let e = reg
            .check_callables(&["orders".to_string(), "ml".to_string()], ruby)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "template t.yml: step `score`: handler.callable \"ml.steps.Score\" is not a Ruby class name; \
             this worker runs its namespace \"ml\": if other workers (another language's) run it, leave it out \
             of this worker's namespaces"
        );
    }

    #[test]
    fn registry_loads_directories_and_rejects_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/d.yaml"), DIAMOND).unwrap();
        std::fs::write(dir.path().join("ignored.txt"), "not yaml").unwrap();
        let reg = TemplateRegistry::load(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.namespaces(), vec!["demo".to_string()]);
        assert!(reg.get("demo", "diamond", "1.0.0").is_some());

        std::fs::write(dir.path().join("copy.yml"), DIAMOND).unwrap();
        let e = TemplateRegistry::load(&[dir.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("already defined"), "{e}");

        let e = TemplateRegistry::load(&[dir.path().join("missing")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("templates: ") && e.contains("missing"), "{e}");
    }
}
