//! Finding tasks (`TaskerCore.tasks`, `GET /api/tasks`): filters, newest first, pages linked by
//! an opaque cursor. A cursor names the last task of a page (its creation time and uuid), so the
//! next page starts right after it however many tasks were created meanwhile: no offsets, no
//! skipped or repeated rows, and on PostgreSQL every page is one index range scan.

use crate::error::{EngineError, EngineResult};
use crate::events::{TaskSnapshot, TaskStatus};
use serde_json::{json, Map, Value};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use std::time::{Duration, UNIX_EPOCH};
use uuid::Uuid;

pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 1000;
/// The parameters a query takes (anything else is refused by name).
pub const PARAMETERS: &[&str] = &[
    "status",
    "namespace",
    "name",
    "created_after",
    "limit",
    "cursor",
];

/// Where a page ends: tasks are ordered by (created_at, task_uuid), newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub created_at_ns: u64,
    pub task_uuid: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}-{}", self.created_at_ns, self.task_uuid.simple())
    }

    fn decode(text: &str) -> EngineResult<Self> {
        let bad = || {
            EngineError::InvalidArgument(format!(
                "cursor: {text:?} is not a cursor (pass the next_cursor of a previous page)"
            ))
        };
        let (ns, uuid) = text.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            created_at_ns: ns.parse().map_err(|_| bad())?,
            task_uuid: Uuid::try_parse(uuid).map_err(|_| bad())?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskQuery {
    pub status: Option<TaskStatus>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Only tasks created strictly after this (ns since the Unix epoch).
    pub created_after_ns: Option<u64>,
    pub limit: usize,
    /// Only tasks older than this one (the next page).
    pub after: Option<Cursor>,
}

impl Default for TaskQuery {
    fn default() -> Self {
        Self {
            status: None,
            namespace: None,
            name: None,
            created_after_ns: None,
            limit: DEFAULT_LIMIT,
            after: None,
        }
    }
}

impl TaskQuery {
    /// Parse and check the parameters; each error names its parameter (the HTTP API answers it
    /// with 400, Ruby raises `ArgumentError`). Values may be strings (a URL's query) or JSON
    /// values (Ruby's keywords); nil means "not given".
    pub fn from_params(params: &Map<String, Value>) -> EngineResult<Self> {
        if let Some(unknown) = params.keys().find(|k| !PARAMETERS.contains(&k.as_str())) {
            return Err(EngineError::InvalidArgument(format!(
                "{unknown}: unknown parameter (known: {})",
                PARAMETERS.join(", ")
            )));
        }
        let get = |key: &str| params.get(key).filter(|v| !v.is_null());
        let text = |key: &str| -> EngineResult<Option<String>> {
            get(key)
                .map(|v| match v {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    other => Err(EngineError::InvalidArgument(format!(
                        "{key}: expected a non-empty string, got {other}"
                    ))),
                })
                .transpose()
        };
        let status = text("status")?
            .map(|s| {
                TaskStatus::parse(&s).ok_or_else(|| {
                    EngineError::InvalidArgument(format!(
                        "status: unknown status {s:?} (pending, in_progress, complete, error or cancelled)"
                    ))
                })
            })
            .transpose()?;
        let limit = match get("limit") {
            None => DEFAULT_LIMIT,
            Some(v) => {
                let n = v
                    .as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .filter(|n| (1..=MAX_LIMIT as u64).contains(n))
                    .ok_or_else(|| {
                        EngineError::InvalidArgument(format!(
                            "limit: expected an integer from 1 to {MAX_LIMIT}, got {v}"
                        ))
                    })?;
                n as usize
            }
        };
        Ok(Self {
            status,
            namespace: text("namespace")?,
            name: text("name")?,
            created_after_ns: get("created_after").map(instant_ns).transpose()?,
            limit,
            after: text("cursor")?.as_deref().map(Cursor::decode).transpose()?,
        })
    }

    fn matches(&self, task: &TaskSummary) -> bool {
        self.status.is_none_or(|s| s == task.status)
            && self
                .namespace
                .as_deref()
                .is_none_or(|n| n == task.namespace)
            && self.name.as_deref().is_none_or(|n| n == task.name)
            && self
                .created_after_ns
                .is_none_or(|at| task.created_at_ns > at)
            && self.after.is_none_or(|c| task.cursor() < c)
    }

    /// One page of `tasks` (any order), for backends that hold their tasks in memory.
    pub fn page_of(&self, tasks: impl Iterator<Item = TaskSummary>) -> TaskPage {
        let mut found: Vec<TaskSummary> = tasks.filter(|t| self.matches(t)).collect();
        found.sort_unstable_by_key(|t| std::cmp::Reverse(t.cursor()));
        TaskPage::from_newest(found, self.limit)
    }
}

/// `created_after`: seconds since the Unix epoch (a number, or a numeric string) or an RFC 3339 /
/// ISO 8601 time such as `2026-11-30T12:00:00Z`.
fn instant_ns(v: &Value) -> EngineResult<u64> {
    let bad = || {
        EngineError::InvalidArgument(format!(
            "created_after: expected a time (ISO 8601 such as \"2026-11-30T12:00:00Z\", or seconds since the epoch), got {v}"
        ))
    };
    let seconds = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse::<f64>().ok().or_else(|| {
            humantime::parse_rfc3339_weak(s)
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64())
        }),
        _ => None,
    }
    .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e11)
    .ok_or_else(bad)?;
    Ok((seconds * 1e9) as u64)
}

/// One line of a task list: what a list shows, without the steps.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSummary {
    pub task_uuid: Uuid,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub status: TaskStatus,
    pub created_at_ns: u64,
    pub completed_at_ns: Option<u64>,
}

impl TaskSummary {
    pub fn cursor(&self) -> Cursor {
        Cursor {
            created_at_ns: self.created_at_ns,
            task_uuid: self.task_uuid,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "task_uuid": self.task_uuid.to_string(),
            "namespace": self.namespace,
            "name": self.name,
            "version": self.version,
            "status": self.status.as_str(),
            "created_at": iso8601(Some(self.created_at_ns)),
            "completed_at": iso8601(self.completed_at_ns),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskPage {
    /// Newest first.
    pub tasks: Vec<TaskSummary>,
    /// Pass it as `cursor` for the next (older) page; `None` on the last page.
    pub next_cursor: Option<String>,
}

impl TaskPage {
    /// From up to `limit + 1` matches, newest first: one more than a page tells a next page exists.
    fn from_newest(mut found: Vec<TaskSummary>, limit: usize) -> Self {
        let more = found.len() > limit;
        found.truncate(limit);
        let next_cursor = more
            .then(|| found.last().map(|t| t.cursor().encode()))
            .flatten();
        Self {
            tasks: found,
            next_cursor,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tasks": self.tasks.iter().map(TaskSummary::to_json).collect::<Vec<_>>(),
            "next_cursor": self.next_cursor,
        })
    }
}

/// ns since the Unix epoch → ISO 8601 UTC with milliseconds (as `task_status` gives them).
pub fn iso8601(ns: Option<u64>) -> Option<String> {
    ns.map(|ns| humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string())
}

/// `task_status` as JSON: the same keys as the Ruby Hash.
pub fn snapshot_json(snapshot: &TaskSnapshot) -> Value {
    json!({
        "task_uuid": snapshot.task_uuid.to_string(),
        "namespace": snapshot.namespace,
        "name": snapshot.name,
        "version": snapshot.version,
        "status": snapshot.status.as_str(),
        "created_at": iso8601(snapshot.created_at_ns),
        "completed_at": iso8601(snapshot.completed_at_ns),
        "steps_retained": snapshot.steps_retained,
        "steps": snapshot.steps.iter().map(|step| json!({
            "step_uuid": step.step_uuid.to_string(),
            "name": step.name,
            "status": step.status.as_str(),
            "attempts": step.attempts,
            "result": step.result.as_deref(),
            "metadata": step.metadata.as_deref().cloned().unwrap_or_else(|| json!({})),
            "error_message": step.error_message,
            "started_at": iso8601(step.started_at_ns),
            "completed_at": iso8601(step.completed_at_ns),
            "duration_ms": match (step.started_at_ns, step.completed_at_ns) {
                (Some(start), Some(end)) => Some(end.saturating_sub(start) as f64 / 1e6),
                _ => None,
            },
        })).collect::<Vec<_>>(),
    })
}

/// One page from PostgreSQL. Only the filters given enter the SQL, so that each shape of query
/// has a plan of its own on the indexes of migration 20261130000010 (newest first within a
/// status, a namespace and name, or all tasks).
pub async fn postgres_page(pool: &PgPool, query: &TaskQuery) -> EngineResult<TaskPage> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(
        "SELECT task_uuid, namespace, name, version, status, \
         (extract(epoch FROM created_at) * 1000000)::int8 AS created_us, \
         (extract(epoch FROM finished_at) * 1000000)::int8 AS finished_us \
         FROM tasker_tasks WHERE true",
    );
    if let Some(status) = query.status {
        sql.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some(namespace) = &query.namespace {
        sql.push(" AND namespace = ").push_bind(namespace.clone());
    }
    if let Some(name) = &query.name {
        sql.push(" AND name = ").push_bind(name.clone());
    }
    if let Some(after) = query.created_after_ns {
        sql.push(" AND created_at > 'epoch'::timestamptz + ")
            .push_bind((after / 1000) as i64)
            .push(" * interval '1 microsecond'");
    }
    if let Some(cursor) = query.after {
        sql.push(" AND (created_at, task_uuid) < ('epoch'::timestamptz + ")
            .push_bind((cursor.created_at_ns / 1000) as i64)
            .push(" * interval '1 microsecond', ")
            .push_bind(cursor.task_uuid)
            .push(")");
    }
    sql.push(" ORDER BY created_at DESC, task_uuid DESC LIMIT ")
        .push_bind((query.limit + 1) as i64);
    let rows = sql
        .build()
        .fetch_all(pool)
        .await
        .map_err(|e| EngineError::backend("listing tasks failed", e))?;
    let found = rows
        .iter()
        .map(|row| {
            let status: String = row.try_get("status")?;
            Ok(TaskSummary {
                task_uuid: row.try_get("task_uuid")?,
                namespace: row.try_get("namespace")?,
                name: row.try_get("name")?,
                version: row.try_get("version")?,
                status: TaskStatus::parse(&status).unwrap_or(TaskStatus::Pending),
                created_at_ns: row.try_get::<i64, _>("created_us")?.max(0) as u64 * 1000,
                completed_at_ns: row
                    .try_get::<Option<i64>, _>("finished_us")?
                    .map(|us| us.max(0) as u64 * 1000),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(|e| EngineError::backend("reading the task list failed", e))?;
    Ok(TaskPage::from_newest(found, query.limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(n: u64, status: TaskStatus) -> TaskSummary {
        TaskSummary {
            task_uuid: Uuid::from_u128(n as u128),
            namespace: if n.is_multiple_of(2) { "even" } else { "odd" }.into(),
            name: "t".into(),
            version: "1.0.0".into(),
            status,
            created_at_ns: n * 1000,
            completed_at_ns: None,
        }
    }

    fn query(params: Value) -> EngineResult<TaskQuery> {
        TaskQuery::from_params(params.as_object().unwrap())
    }

    #[test]
    fn pages_newest_first_without_gaps_or_repeats() {
        let all: Vec<_> = (1..=25).map(|n| task(n, TaskStatus::Complete)).collect();
        let mut q = query(json!({"limit": 10})).unwrap();
        let mut seen = Vec::new();
        loop {
            let page = q.page_of(all.iter().cloned());
            seen.extend(page.tasks.iter().map(|t| t.created_at_ns / 1000));
            match page.next_cursor {
                Some(c) => q = query(json!({"limit": 10, "cursor": c})).unwrap(),
                None => break,
            }
        }
        assert_eq!(seen, (1..=25).rev().collect::<Vec<_>>());
    }

    #[test]
    fn filters() {
        let all: Vec<_> = (1..=10)
            .map(|n| {
                task(
                    n,
                    if n <= 3 {
                        TaskStatus::Error
                    } else {
                        TaskStatus::Complete
                    },
                )
            })
            .collect();
        let page = query(json!({"status": "error", "namespace": "odd"}))
            .unwrap()
            .page_of(all.iter().cloned());
        assert_eq!(
            page.tasks
                .iter()
                .map(|t| t.created_at_ns / 1000)
                .collect::<Vec<_>>(),
            vec![3, 1]
        );
        assert!(page.next_cursor.is_none());
        let page = query(json!({"created_after": "0.000008"}))
            .unwrap()
            .page_of(all.iter().cloned());
        assert_eq!(page.tasks.len(), 2);
    }

    #[test]
    fn bad_parameters_are_named() {
        for (params, name) in [
            (json!({"status": "done"}), "status"),
            (json!({"limit": 0}), "limit"),
            (json!({"limit": "many"}), "limit"),
            (json!({"limit": 1001}), "limit"),
            (json!({"cursor": "nope"}), "cursor"),
            (json!({"created_after": "yesterday"}), "created_after"),
            (json!({"namespace": ""}), "namespace"),
            (json!({"colour": "red"}), "colour"),
        ] {
            let err = query(params.clone()).unwrap_err();
            assert!(matches!(err, EngineError::InvalidArgument(_)), "{params}");
            assert!(err.to_string().starts_with(name), "{params}: {err}");
        }
        let at = query(json!({"created_after": "2026-11-30T12:00:00Z"}))
            .unwrap()
            .created_after_ns
            .unwrap();
        assert_eq!(at, 1_796_040_000 * 1_000_000_000);
    }
}
