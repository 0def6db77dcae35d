//! The routes: `/health`, `/ready`, `/status`, `/metrics`, the task API, the dashboard and its
//! login; JSON errors for everything else.

use super::{assets, WebState};
use crate::attempt::Phase;
use crate::backend::BackendGauges;
use crate::engine::EngineMessage;
use crate::error::{EngineError, EngineResult};
use crate::graph::{self, GraphFormat};
use crate::metrics::{NamespaceLabels, StateLabels, TaskLabels};
use crate::status::{WorkerState, WorkerSystemStatus};
use crate::task_list::{postgres_page, snapshot_json, TaskQuery};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::debug;
use uuid::Uuid;

/// How long a probe or a scrape waits for the database or the engine before answering without it.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a count of finished tasks is reused (see `finished_task_counts`).
const FINISHED_COUNTS_EVERY: Duration = Duration::from_secs(60);
/// Up to this many finished tasks, they are counted at every scrape (a few ms).
const FINISHED_COUNTED_EVERY_SCRAPE: u64 = 100_000;
const FINISHED_COUNT_TIMEOUT: Duration = Duration::from_secs(5);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(super) fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/api/tasks", get(list_tasks))
        .route("/api/tasks/{uuid}", get(task_status))
        .route("/api/tasks/{uuid}/graph.svg", get(task_graph_svg))
        .route("/api/tasks/{uuid}/cancel", post(cancel_task))
        .route("/api/tasks/{uuid}/retry", post(retry_task))
        .route("/api/session", get(session))
        .route("/api/overview", get(overview))
        .route("/", get(dashboard))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/{file}", get(asset))
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
            "no route for {method} {} (routes: GET /, /health, /ready, /status, /metrics, /api/tasks, \
             /api/tasks/<uuid>, /api/tasks/<uuid>/graph.svg, /api/overview)",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {} (the task actions are POST, everything else GET)",
            uri.path()
        ),
    )
}

/// The cookie the login form sets (the token itself, HttpOnly and SameSite=Strict).
pub(super) const TOKEN_COOKIE: &str = "tasker_web_token";

/// With `web_api_token`, every route wants `Authorization: Bearer <token>` or the login cookie,
/// except the login form and the static assets (which hold nothing about the workers). A browser
/// asking for the dashboard without either is sent to the login form.
async fn require_token(
    State(state): State<Arc<WebState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if path == "/login" || path.starts_with("/assets/") {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string())
        .or_else(|| cookie(request.headers(), TOKEN_COOKIE));
    match presented {
        Some(presented) if constant_time_eq(presented.as_bytes(), token.as_bytes()) => {
            next.run(request).await
        }
        _ if path == "/" => (StatusCode::SEE_OTHER, [(header::LOCATION, "login")]).into_response(),
        _ => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (send Authorization: Bearer <web_api_token>, or log in \
                 at /login)",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// A cookie's value (percent-decoded), if the request has it.
fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| {
            form_urlencoded::parse(format!("v={value}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
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
        EngineError::Bootstrap(_)
        | EngineError::StartFailed { .. }
        | EngineError::Internal(_)
        | EngineError::Backend { .. } => StatusCode::INTERNAL_SERVER_ERROR,
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
        Some(pool) => match database_gauges(state, pool).await {
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
async fn database_gauges(state: &WebState, pool: &sqlx::PgPool) -> Result<Counts, String> {
    let read = async {
        // Unfinished tasks are few and on the status index: counted exactly at every scrape.
        let tasks: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT namespace, status, count(*)::int8 FROM tasker_tasks
             WHERE status IN ('pending', 'in_progress') GROUP BY namespace, status",
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
    let mut counts = match tokio::time::timeout(LOOKUP_TIMEOUT, read).await {
        Ok(result) => result.map_err(|e| e.to_string())?,
        Err(_) => return Err(format!("no answer within {}s", LOOKUP_TIMEOUT.as_secs())),
    };
    counts.tasks.extend(finished_task_counts(state, pool).await);
    Ok(counts)
}

/// Finished tasks by namespace and status. Counting them reads every finished row (a third of a
/// second per million tasks here), so once there are more than `FINISHED_COUNTED_EVERY_SCRAPE`
/// the count is taken at most once a minute and reused in between. If it fails or takes too
/// long, the last one stands.
async fn finished_task_counts(state: &WebState, pool: &sqlx::PgPool) -> Vec<(String, String, u64)> {
    let cached = state
        .finished_tasks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some((at, counts)) = &cached {
        let finished: u64 = counts.iter().map(|(_, _, n)| n).sum();
        if finished > FINISHED_COUNTED_EVERY_SCRAPE && at.elapsed() < FINISHED_COUNTS_EVERY {
            return counts.clone();
        }
    }
    let count = sqlx::query_as::<_, (String, String, i64)>(
        "SELECT namespace, status, count(*)::int8 FROM tasker_tasks
         WHERE status NOT IN ('pending', 'in_progress') GROUP BY namespace, status",
    )
    .fetch_all(pool);
    match tokio::time::timeout(FINISHED_COUNT_TIMEOUT, count).await {
        Ok(Ok(rows)) => {
            let counts: Vec<_> = rows
                .into_iter()
                .map(|(namespace, status, n)| (namespace, status, n.max(0) as u64))
                .collect();
            *state
                .finished_tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), counts.clone()));
            counts
        }
        failed => {
            debug!(
                ?failed,
                "metrics: counting finished tasks failed; the last count stands"
            );
            cached.map(|(_, counts)| counts).unwrap_or_default()
        }
    }
}

/// `GET /api/tasks/<uuid>/graph.svg`: the task's DAG with each step's state.
async fn task_graph_svg(State(state): State<Arc<WebState>>, Path(uuid): Path<String>) -> Response {
    let snapshot = match snapshot_of(&state, &uuid).await {
        Ok(snapshot) => snapshot,
        Err(response) => return response,
    };
    let template = state
        .templates
        .get(&snapshot.namespace, &snapshot.name, &snapshot.version)
        .cloned();
    let svg = graph::render(&snapshot, template.as_deref(), GraphFormat::Svg);
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        svg,
    )
        .into_response()
}

async fn snapshot_of(
    state: &WebState,
    uuid: &str,
) -> Result<crate::events::TaskSnapshot, Response> {
    let Ok(task_uuid) = Uuid::try_parse(uuid) else {
        return Err(not_a_uuid(uuid));
    };
    ask_engine(state, |reply| EngineMessage::TaskStatus {
        task_uuid,
        reply,
    })
    .await
    .map_err(engine_error)
}

/// A POST that changes something: only with `web_api_actions: true`, and only with the CSRF
/// token a page of this origin read from `GET /api/session` (another site's form or script can
/// neither read that answer nor set the header without a CORS preflight, which nothing here allows).
fn refuse_action(state: &WebState, headers: &axum::http::HeaderMap) -> Option<Response> {
    if !state.actions {
        return Some(error(
            StatusCode::FORBIDDEN,
            "actions are disabled: start the worker with web_api_actions: true (or mount \
             TaskerCore::Web with actions: true) to cancel and retry tasks from the web",
        ));
    }
    let presented = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), state.csrf_token.as_bytes()) {
        return Some(error(
            StatusCode::FORBIDDEN,
            "X-CSRF-Token: missing or wrong (read csrf_token from GET /api/session)",
        ));
    }
    None
}

fn not_a_uuid(uuid: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("unknown task {uuid:?}: not a UUID"),
    )
}

/// `POST /api/tasks/<uuid>/cancel` (`TaskerCore.cancel_task`): `{"cancelled": bool}`.
async fn cancel_task(
    State(state): State<Arc<WebState>>,
    Path(uuid): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(refusal) = refuse_action(&state, &headers) {
        return refusal;
    }
    let Ok(task_uuid) = Uuid::try_parse(&uuid) else {
        return not_a_uuid(&uuid);
    };
    match ask_engine(&state, |reply| EngineMessage::CancelTask {
        task_uuid,
        reply,
    })
    .await
    {
        Ok(cancelled) => Json(json!({ "cancelled": cancelled })).into_response(),
        Err(e) => engine_error(e),
    }
}

/// `POST /api/tasks/<uuid>/retry` (`TaskerCore.retry_task`): `{"retried": true}`; 400 for a task
/// still running or complete.
async fn retry_task(
    State(state): State<Arc<WebState>>,
    Path(uuid): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(refusal) = refuse_action(&state, &headers) {
        return refusal;
    }
    let Ok(task_uuid) = Uuid::try_parse(&uuid) else {
        return not_a_uuid(&uuid);
    };
    match ask_engine(&state, |reply| EngineMessage::RetryTask {
        task_uuid,
        reply,
    })
    .await
    {
        Ok(()) => Json(json!({ "retried": true })).into_response(),
        Err(e) => engine_error(e),
    }
}

/// `GET /api/session`: what the dashboard may show (the action buttons) and the CSRF token its
/// POSTs send.
async fn session(State(state): State<Arc<WebState>>) -> Response {
    let mut body = json!({
        "actions": state.actions,
        "token_required": state.token.is_some(),
    });
    if state.actions {
        body["csrf_token"] = state.csrf_token.clone().into();
    }
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// `GET /api/overview`: tasks by status, queue depth, this worker's state and its steps/s over
/// the last minutes.
async fn overview(State(state): State<Arc<WebState>>) -> Response {
    state.sample();
    let counts = match &state.database {
        Some(pool) => database_gauges(&state, pool).await.ok(),
        None => engine_gauges(&state).await,
    };
    let mut by_status = serde_json::Map::new();
    for status in ["pending", "in_progress", "complete", "error", "cancelled"] {
        by_status.insert(status.into(), 0.into());
    }
    // Claims exist only on PostgreSQL: null on the memory backend, a count (maybe 0) there.
    let mut claimed = state.database.as_ref().map(|_| 0u64);
    let (mut ready, mut waiting) = (0u64, 0u64);
    if let Some(counts) = &counts {
        for (_, status, n) in &counts.tasks {
            let entry = by_status.entry(status.clone()).or_insert(0.into());
            *entry = (entry.as_u64().unwrap_or(0) + n).into();
        }
        for (_, r, w, c) in &counts.steps {
            ready += r;
            waiting += w;
            if let Some(c) = c {
                claimed = Some(claimed.unwrap_or(0) + c);
            }
        }
    }
    let samples: Vec<(u64, u64)> = state
        .samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect();
    let throughput: Vec<Value> = samples
        .windows(2)
        .map(|w| {
            let (t0, n0) = w[0];
            let (t1, n1) = w[1];
            let seconds = t1.saturating_sub(t0).max(1) as f64;
            json!({ "at": t1, "steps_per_second": n1.saturating_sub(n0) as f64 / seconds })
        })
        .collect();
    let status = state.shared.status();
    Json(json!({
        "worker": status_json(&status),
        "tasks_by_status": by_status,
        "counts_available": counts.is_some(),
        "queue": {
            "ready": ready,
            "waiting_for_retry": waiting,
            "claimed": claimed,
            "in_flight": state.shared.in_flight.load(Ordering::Acquire),
        },
        "throughput": throughput,
        "sample_every_seconds": super::SAMPLE_EVERY.as_secs(),
    }))
    .into_response()
}

async fn dashboard() -> Response {
    assets::page(assets::INDEX_HTML)
}

async fn login_page(State(state): State<Arc<WebState>>) -> Response {
    if state.token.is_none() {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "./")]).into_response();
    }
    assets::page(assets::LOGIN_HTML)
}

/// Where the dashboard is mounted (the Rack app says so in `X-Tasker-Script-Name`), so that
/// the login cookie goes only to it.
fn cookie_path(headers: &axum::http::HeaderMap) -> String {
    let mount = headers
        .get("x-tasker-script-name")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.starts_with('/') && !v.contains([';', ',', ' ']))
        .unwrap_or("")
        .trim_end_matches('/');
    format!("{mount}/")
}

fn secure_attribute(headers: &axum::http::HeaderMap) -> &'static str {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    if https {
        "; Secure"
    } else {
        ""
    }
}

/// `POST /login` with the form field `token`: sets the login cookie and goes to the dashboard.
async fn login(
    State(state): State<Arc<WebState>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(token) = &state.token else {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "./")]).into_response();
    };
    let presented = form_urlencoded::parse(&body)
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    if !constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        let mut response = assets::page(assets::LOGIN_HTML);
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let value: String = form_urlencoded::byte_serialize(presented.as_bytes()).collect();
    let cookie = format!(
        "{TOKEN_COOKIE}={value}; Path={}; HttpOnly; SameSite=Strict{}",
        cookie_path(&headers),
        secure_attribute(&headers)
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "./".to_string()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

/// `POST /logout`: forgets the login cookie.
async fn logout(headers: axum::http::HeaderMap) -> Response {
    let cookie = format!(
        "{TOKEN_COOKIE}=; Path={}; HttpOnly; SameSite=Strict; Max-Age=0",
        cookie_path(&headers)
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "login".to_string()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

async fn asset(Path(file): Path<String>) -> Response {
    match assets::named(&file) {
        Some(response) => response,
        None => error(StatusCode::NOT_FOUND, format!("no asset {file:?}")),
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
