//! The routes: `/health`, `/ready`, `/status`, `/metrics`; JSON errors for everything else.

use super::WebState;
use crate::backend::BackendGauges;
use crate::engine::EngineMessage;
use crate::error::{EngineError, EngineResult};
use crate::events::Phase;
use crate::metrics::{NamespaceLabels, StateLabels, TaskLabels};
use crate::status::{WorkerState, WorkerSystemStatus};
use crate::task_list::{postgres_page, snapshot_json, TaskQuery};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;
use uuid::Uuid;

/// How long a probe or a scrape waits for the database or the engine before answering without it.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(super) fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/api/tasks", get(list_tasks))
        .route("/api/tasks/{uuid}", get(task_status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no route for {method} {} (routes: GET /health, /ready, /status, /metrics, /api/tasks, \
             /api/tasks/<uuid>)",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {} (use GET)", uri.path()),
    )
}

/// With `web_api_token`, every route wants `Authorization: Bearer <token>`.
async fn require_token(
    State(state): State<Arc<WebState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(presented) if constant_time_eq(presented.as_bytes(), token.as_bytes()) => {
            next.run(request).await
        }
        _ => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (send Authorization: Bearer <web_api_token>)",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// Compares without stopping at the first difference, so timing tells nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Liveness: the process answers and its engine has not died.
async fn health(State(state): State<Arc<WebState>>) -> Response {
    let worker_state = state.shared.state();
    let body = Json(
        json!({ "status": if worker_state == WorkerState::Error { "error" } else { "ok" },
                            "state": worker_state.as_str() }),
    );
    if worker_state == WorkerState::Error {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else {
        (StatusCode::OK, body).into_response()
    }
}

/// Readiness: running, not draining, and (on PostgreSQL) the database answers.
async fn ready(State(state): State<Arc<WebState>>) -> Response {
    let worker_state = state.shared.state();
    let mut checks = serde_json::Map::new();
    let mut reason = None;
    if worker_state != WorkerState::Running {
        reason = Some(format!("the worker is {}", worker_state.as_str()));
    }
    checks.insert("state".into(), worker_state.as_str().into());
    if let Some(pool) = &state.database {
        let reachable = database_reachable(pool).await;
        if let Err(e) = &reachable {
            reason.get_or_insert_with(|| format!("the database is not reachable: {e}"));
        }
        checks.insert("database".into(), reachable.is_ok().into());
    }
    let ready = reason.is_none();
    checks.insert("ready".into(), ready.into());
    if let Some(reason) = reason {
        checks.insert("reason".into(), reason.into());
    }
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(Value::Object(checks))).into_response()
}

async fn database_reachable(pool: &sqlx::PgPool) -> Result<(), String> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, sqlx::query("SELECT 1").execute(pool)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", LOOKUP_TIMEOUT.as_secs())),
    }
}

async fn status(State(state): State<Arc<WebState>>) -> Response {
    Json(status_json(&state.shared.status())).into_response()
}

/// `worker_status` as JSON: the same keys as the Ruby Hash.
pub(crate) fn status_json(status: &WorkerSystemStatus) -> Value {
    json!({
        "running": status.running,
        "state": status.state.as_str(),
        "worker_id": status.worker_id,
        "environment": status.environment,
        "backend": status.backend,
        "deployment_mode": status.deployment_mode,
        "concurrency": status.concurrency,
        "uptime_seconds": status.uptime_seconds,
        "steps_processed": status.steps_processed,
        "steps_failed": status.steps_failed,
        "steps_in_flight": status.steps_in_flight,
        "supported_namespaces": status.supported_namespaces,
        "web_api_enabled": status.web_api_enabled,
        "web_api_bind": status.web_api_bind.map(|a| a.to_string()),
        "database_pool_size": status.database_pool_size,
        "database_pool_idle": status.database_pool_idle,
    })
}

/// The HTTP answer for an engine error: a bad parameter is the client's fault (400, naming it),
/// an unknown task is 404, a worker stopping is 503.
fn engine_error(e: EngineError) -> Response {
    let status = match &e {
        EngineError::InvalidArgument(_) | EngineError::Configuration(_) => StatusCode::BAD_REQUEST,
        EngineError::UnknownTask(_) => StatusCode::NOT_FOUND,
        EngineError::NotInitialized | EngineError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        EngineError::Bootstrap(_) | EngineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// Ask the engine thread (it owns the in-process backend) and wait for its answer off this
/// runtime's thread, for at most `LOOKUP_TIMEOUT`.
async fn ask_engine<T: Send + 'static>(
    state: &WebState,
    message: impl FnOnce(crossbeam_channel::Sender<EngineResult<T>>) -> EngineMessage,
) -> EngineResult<T> {
    let (reply, answer) = crossbeam_channel::bounded(1);
    state
        .inbox
        .send(message(reply))
        .map_err(|_| EngineError::NotInitialized)?;
    tokio::task::spawn_blocking(move || answer.recv_timeout(LOOKUP_TIMEOUT))
        .await
        .map_err(|e| EngineError::Internal(format!("waiting for the engine failed: {e}")))?
        .map_err(|_| {
            EngineError::Internal(format!(
                "the engine did not answer within {}s",
                LOOKUP_TIMEOUT.as_secs()
            ))
        })?
}

/// `GET /api/tasks?status=&namespace=&name=&created_after=&limit=&cursor=`: one page, newest
/// first (`TaskerCore.tasks`). On PostgreSQL read from the database directly (the whole system,
/// without going through the engine thread).
async fn list_tasks(
    State(state): State<Arc<WebState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let params = params
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let query = match TaskQuery::from_params(&params) {
        Ok(query) => query,
        Err(e) => return engine_error(e),
    };
    let page = match &state.database {
        Some(pool) => {
            match tokio::time::timeout(LOOKUP_TIMEOUT, postgres_page(pool, &query)).await {
                Ok(page) => page,
                Err(_) => Err(EngineError::Internal(format!(
                    "the database did not answer within {}s",
                    LOOKUP_TIMEOUT.as_secs()
                ))),
            }
        }
        None => ask_engine(&state, |reply| EngineMessage::ListTasks { query, reply }).await,
    };
    match page {
        Ok(page) => Json(page.to_json()).into_response(),
        Err(e) => engine_error(e),
    }
}

/// `GET /api/tasks/<uuid>`: `task_status` as JSON; 404 for a task nobody knows.
async fn task_status(State(state): State<Arc<WebState>>, Path(uuid): Path<String>) -> Response {
    let Ok(task_uuid) = Uuid::try_parse(&uuid) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown task {uuid:?}: not a UUID"),
        );
    };
    match ask_engine(&state, |reply| EngineMessage::TaskStatus {
        task_uuid,
        reply,
    })
    .await
    {
        Ok(snapshot) => Json(snapshot_json(&snapshot)).into_response(),
        Err(e) => engine_error(e),
    }
}

async fn metrics(State(state): State<Arc<WebState>>) -> Response {
    let _one_at_a_time = state.scrape.lock().await;
    refresh_gauges(&state).await;
    let body = state.shared.metrics.encode();
    ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response()
}

/// Fill the gauges from the atomics, the in-flight registry and the backend or database.
async fn refresh_gauges(state: &WebState) {
    let shared = &state.shared;
    let gauges = &shared.metrics.gauges;
    gauges
        .uptime_seconds
        .set(shared.started_at.elapsed().as_secs_f64());
    gauges
        .up
        .set(i64::from(shared.state() == WorkerState::Running));
    gauges
        .steps_in_flight
        .set(shared.in_flight.load(Ordering::Acquire) as i64);

    // A handler thread is busy from taking an attempt until its handler returns, also past a
    // timeout or a cancel (the attempt is over, the handler still runs).
    let (mut queued, mut busy) = (0i64, 0i64);
    for phase in state.registry.phases() {
        match phase {
            Phase::Queued => queued += 1,
            Phase::Running | Phase::TimedOut | Phase::Cancelled => busy += 1,
            Phase::Done => {}
        }
    }
    gauges.steps_queued_for_handlers.set(queued);
    let threads = shared.concurrency as i64;
    set_states(
        &gauges.handler_threads,
        &[
            ("busy", busy.min(threads)),
            ("idle", (threads - busy).max(0)),
        ],
    );
    let (pool_size, pool_idle) = shared.pool_stats();
    if state.database.is_some() {
        set_states(
            &gauges.database_pool_connections,
            &[("open", pool_size.into()), ("idle", pool_idle.into())],
        );
    }

    let counts = match &state.database {
        Some(pool) => match database_gauges(pool).await {
            Ok(counts) => Some(counts),
            Err(e) => {
                debug!(error = %e, "metrics: reading queue depth and task counts failed");
                None
            }
        },
        None => engine_gauges(state).await,
    };
    gauges.tasks.clear();
    gauges.steps_ready.clear();
    gauges.steps_waiting_for_retry.clear();
    gauges.steps_claimed.clear();
    let Some(counts) = counts else { return };
    for (namespace, status, n) in counts.tasks {
        gauges
            .tasks
            .get_or_create(&TaskLabels {
                namespace,
                status: status.to_string(),
            })
            .set(n as i64);
    }
    for (namespace, ready, waiting, claimed) in counts.steps {
        let labels = NamespaceLabels { namespace };
        gauges.steps_ready.get_or_create(&labels).set(ready as i64);
        gauges
            .steps_waiting_for_retry
            .get_or_create(&labels)
            .set(waiting as i64);
        if let Some(claimed) = claimed {
            gauges
                .steps_claimed
                .get_or_create(&labels)
                .set(claimed as i64);
        }
    }
}

fn set_states(
    family: &prometheus_client::metrics::family::Family<
        StateLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
    values: &[(&str, i64)],
) {
    for (state, value) in values {
        family
            .get_or_create(&StateLabels {
                state: (*state).to_string(),
            })
            .set(*value);
    }
}

struct Counts {
    tasks: Vec<(String, String, u64)>,
    /// (namespace, ready, waiting for retry, claimed if known).
    steps: Vec<(String, u64, u64, Option<u64>)>,
}

/// The in-process backend's counts, asked of the engine thread (answered between its batches).
async fn engine_gauges(state: &WebState) -> Option<Counts> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    state.inbox.send(EngineMessage::Gauges(reply)).ok()?;
    let gauges: BackendGauges = tokio::time::timeout(LOOKUP_TIMEOUT, answer)
        .await
        .ok()?
        .ok()??;
    Some(Counts {
        tasks: gauges
            .tasks
            .into_iter()
            .map(|(namespace, status, n)| (namespace, status.to_string(), n))
            .collect(),
        steps: gauges
            .steps
            .into_iter()
            .map(|(namespace, ready, waiting)| (namespace, ready, waiting, None))
            .collect(),
    })
}

/// Whole-system counts from the database, so that any one worker's `/metrics` tells them all.
async fn database_gauges(pool: &sqlx::PgPool) -> Result<Counts, String> {
    let read = async {
        let tasks: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT namespace, status, count(*)::int8 FROM tasker_tasks GROUP BY namespace, status",
        )
        .fetch_all(pool)
        .await?;
        // A row of the ready table is claimable once visible (a dead worker's claim expires into
        // this too), claimed while a worker's claim holds it back, or waiting out a retry's backoff.
        let steps: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT namespace,
                    count(*) FILTER (WHERE visible_at <= now())::int8,
                    count(*) FILTER (WHERE visible_at > now() AND claimed_by IS NULL)::int8,
                    count(*) FILTER (WHERE visible_at > now() AND claimed_by IS NOT NULL)::int8
             FROM tasker_ready_steps GROUP BY namespace",
        )
        .fetch_all(pool)
        .await?;
        Ok::<_, sqlx::Error>(Counts {
            tasks: tasks
                .into_iter()
                .map(|(namespace, status, n)| (namespace, status, n.max(0) as u64))
                .collect(),
            steps: steps
                .into_iter()
                .map(|(namespace, ready, waiting, claimed)| {
                    (
                        namespace,
                        ready.max(0) as u64,
                        waiting.max(0) as u64,
                        Some(claimed.max(0) as u64),
                    )
                })
                .collect(),
        })
    };
    match tokio::time::timeout(LOOKUP_TIMEOUT, read).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {}s", LOOKUP_TIMEOUT.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
    }
}
