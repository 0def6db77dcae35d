//! The worker's HTTP endpoint (`enable_web_api: true`): health, readiness, status, Prometheus
//! metrics, the task API and the dashboard. The same router also answers requests handed over by
//! the Rack app `TaskerCore::Web` (see [`WebApp`]), so both serve one implementation.
//!
//! It runs on a thread of its own with its own tokio runtime, not on the engine's: the engine
//! thread may be busy for a while (a burst of in-process completions never yields to other
//! tasks), and a probe must answer regardless. Nothing here touches Ruby, so a handler thread
//! holding the GVL cannot delay an answer either. The listener is bound synchronously when the
//! worker starts (a port in use fails the bootstrap, naming the address) and closed before
//! `stop_worker` returns.

mod assets;
mod routes;

use crate::config::WebApiConfig;
use crate::dispatch::InFlightRegistry;
use crate::engine::EngineMessage;
use crate::error::{EngineError, EngineResult};
use crate::status::Shared;
use crate::template::TemplateRegistry;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::net::{SocketAddr, TcpListener};
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tracing::{info, warn};

/// How long a stop lets requests already being answered finish before their connections close.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// A listener bound at bootstrap, not yet serving.
pub struct BoundListener {
    listener: TcpListener,
    config: WebApiConfig,
}

impl BoundListener {
    /// Bind now, so that a port in use fails the bootstrap with a message naming it.
    pub fn bind(config: WebApiConfig) -> EngineResult<Self> {
        let listener = TcpListener::bind(config.bind).map_err(|e| {
            EngineError::Bootstrap(format!(
                "web_api_bind: cannot listen on {}: {e}{}",
                config.bind,
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    " (another process, or another worker, uses this port: choose another web_api_bind)"
                } else {
                    ""
                }
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| EngineError::Bootstrap(format!("web_api_bind: {e}")))?;
        Ok(Self { listener, config })
    }

    /// Where it listens (the real port when `web_api_bind` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.bind)
    }
}

/// What the routes read: shared atomics, the in-flight registry, the engine's inbox (for the
/// in-process backend's counts) and, on PostgreSQL, a small pool of the server's own.
pub(crate) struct WebState {
    pub shared: Arc<Shared>,
    pub registry: Arc<InFlightRegistry>,
    pub inbox: UnboundedSender<EngineMessage>,
    pub templates: Arc<TemplateRegistry>,
    pub database: Option<PgPool>,
    pub token: Option<String>,
    /// `web_api_actions`: the cancel and retry routes answer (otherwise 403).
    pub actions: bool,
    /// What a POST must send in `X-CSRF-Token` (read from `GET /api/session`, which only a page
    /// of the same origin can read).
    pub csrf_token: String,
    /// (seconds since the epoch, steps processed) every `SAMPLE_EVERY`, for the overview's chart.
    pub samples: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// One scrape at a time fills and encodes the gauges.
    pub scrape: tokio::sync::Mutex<()>,
    /// The last count of finished tasks by (namespace, status), and when it was taken.
    pub finished_tasks: std::sync::Mutex<Option<FinishedCounts>>,
}

/// How often the overview's steps/s are sampled, and how many samples are kept (10 minutes).
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(5);
pub(crate) const SAMPLES_KEPT: usize = 120;

/// What a web state is built from: the worker's shared parts.
#[derive(Clone)]
pub struct WebSources {
    pub(crate) shared: Arc<Shared>,
    pub(crate) registry: Arc<InFlightRegistry>,
    pub(crate) inbox: UnboundedSender<EngineMessage>,
    pub(crate) templates: Arc<TemplateRegistry>,
    pub(crate) database_url: Option<String>,
}

impl WebState {
    /// Must run inside the runtime that will serve it: a pool belongs to the runtime it is
    /// created in.
    fn new(sources: WebSources, token: Option<String>, actions: bool) -> EngineResult<Self> {
        let database = sources
            .database_url
            .as_deref()
            .map(|url| {
                PgConnectOptions::from_str(url)
                    .map(|options| options.application_name("tasker-web"))
                    .map_err(|e| EngineError::config(format!("database_url: {e}")))
            })
            .transpose()?;
        Ok(WebState {
            shared: sources.shared,
            registry: sources.registry,
            inbox: sources.inbox,
            templates: sources.templates,
            // Its own connections (two at most, opened on first use): the engine's pool belongs
            // to the engine's runtime, and a probe must not wait behind claims and commits.
            database: database.map(|options| {
                PgPoolOptions::new()
                    .max_connections(2)
                    .min_connections(0)
                    .acquire_timeout(Duration::from_secs(2))
                    .idle_timeout(Duration::from_secs(60))
                    .connect_lazy_with(options)
            }),
            token,
            actions,
            csrf_token: uuid::Uuid::new_v4().simple().to_string(),
            samples: std::sync::Mutex::new(Default::default()),
            scrape: tokio::sync::Mutex::new(()),
            finished_tasks: std::sync::Mutex::new(None),
        })
    }

    /// Record how many steps this worker has processed so far (the overview's steps/s).
    pub(crate) fn sample(&self) {
        let now = crate::events::unix_ns() / 1_000_000_000;
        let processed = self.shared.status().steps_processed;
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.back().is_some_and(|(at, _)| *at == now) {
            return;
        }
        samples.push_back((now, processed));
        while samples.len() > SAMPLES_KEPT + 1 {
            samples.pop_front();
        }
    }
}

/// Sample the steps/s every `SAMPLE_EVERY` while the runtime runs.
async fn sample_forever(state: Arc<WebState>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    loop {
        every.tick().await;
        state.sample();
    }
}

pub(crate) type FinishedCounts = (std::time::Instant, Vec<(String, String, u64)>);

/// The running server; stopping it (or dropping it) closes the listener.
pub struct WebServer {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    address: SocketAddr,
}

impl WebServer {
    pub(crate) fn start(bound: BoundListener, sources: WebSources) -> EngineResult<Self> {
        let address = bound.local_addr();
        let token = bound.config.token.clone();
        let actions = bound.config.actions;
        // Built on the web thread: a pool belongs to the runtime it is created in.
        let state = move || WebState::new(sources, token, actions);
        let (stop, stopped) = watch::channel(false);
        let listener = bound.listener;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        remember_listener(fd);
        let thread = std::thread::Builder::new()
            .name("tasker-web".into())
            .spawn(move || serve(listener, state, stopped))
            .map_err(|e| {
                forget_listener(fd);
                EngineError::Bootstrap(format!("cannot spawn the web thread: {e}"))
            })?;
        info!(%address, "web API listening");
        Ok(Self {
            stop,
            thread: Some(thread),
            address,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stop answering and close the listener; returns once the socket is closed.
    pub fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the web thread ended by panic");
            }
        }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        // Not joined here: the last owner may be a thread that must not block.
        let _ = self.stop.send(true);
    }
}

fn serve(
    listener: TcpListener,
    state: impl FnOnce() -> EngineResult<WebState>,
    stopped: watch::Receiver<bool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            warn!(error = %e, "the web API cannot start its runtime; it does not answer");
            return;
        }
    };
    let run = std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async move {
            let state = match state() {
                Ok(state) => Arc::new(state),
                Err(e) => {
                    warn!(error = %e, "the web API cannot start; it does not answer");
                    return;
                }
            };
            tokio::spawn(sample_forever(Arc::clone(&state)));
            let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => ForgottenBeforeClose {
                    inner: listener,
                    fd,
                },
                Err(e) => {
                    forget_listener(fd);
                    warn!(error = %e, "the web API cannot use its listener");
                    return;
                }
            };
            let mut graceful = stopped.clone();
            let mut hard = stopped;
            let server =
                axum::serve(listener, routes::router(state)).with_graceful_shutdown(async move {
                    let _ = graceful.wait_for(|stop| *stop).await;
                });
            tokio::select! {
                result = server => {
                    if let Err(e) = result {
                        warn!(error = %e, "the web API stopped");
                    }
                }
                // Keep-alive connections of slow clients must not hold the stop up.
                _ = async move {
                    let _ = hard.wait_for(|stop| *stop).await;
                    tokio::time::sleep(STOP_GRACE).await;
                } => {}
            }
        })
    });
    if std::panic::catch_unwind(run).is_err() {
        warn!("the web API panicked; it no longer answers");
    }
    // Dropping the runtime closes every socket it still holds.
    drop(runtime);
}

/// The listening socket of the running server, for [`close_listener_in_child`]; -1 when none.
static LISTENING_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Runs in the child of every `fork` (registered with `pthread_atfork`): the child has no web
/// thread, so it must not keep the parent's listening socket either, or the port stays taken
/// after the parent stops and connections queue up on a socket nobody accepts from. Only
/// async-signal-safe calls here (an atomic load and `close`).
extern "C" fn close_listener_in_child() {
    let fd = LISTENING_FD.swap(-1, std::sync::atomic::Ordering::AcqRel);
    if fd >= 0 {
        // SAFETY: the descriptor was the parent's listener; in the child nothing else uses it.
        unsafe {
            libc::close(fd);
        }
    }
}

fn remember_listener(fd: i32) {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only makes async-signal-safe calls.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(close_listener_in_child)) };
        if rc != 0 {
            warn!(
                rc,
                "pthread_atfork failed: a forked child would keep the web API's socket"
            );
        }
    });
    LISTENING_FD.store(fd, std::sync::atomic::Ordering::Release);
}

/// Forget before the socket closes, never after: a fork in between would otherwise close, in the
/// child, whatever file reused the number (the worst a fork in the other order can do is leave the
/// child a copy of a socket about to close).
fn forget_listener(fd: i32) {
    let _ = LISTENING_FD.compare_exchange(
        fd,
        -1,
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
    );
}

/// The server's listener, which forgets its descriptor (see [`forget_listener`]) just before it
/// closes, whenever axum drops it.
struct ForgottenBeforeClose {
    inner: tokio::net::TcpListener,
    fd: i32,
}

impl Drop for ForgottenBeforeClose {
    fn drop(&mut self) {
        forget_listener(self.fd);
    }
}

impl axum::serve::Listener for ForgottenBeforeClose {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    fn accept(&mut self) -> impl std::future::Future<Output = (Self::Io, Self::Addr)> + Send {
        axum::serve::Listener::accept(&mut self.inner)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The web routes for requests that do not come through the worker's listener: the Rack app
/// `TaskerCore::Web` hands each request here (through the bridge, without the GVL), so a
/// dashboard mounted in a Rails app and the one at the worker's `/` are the same code.
pub struct WebApp {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

/// One answer of [`WebApp::call`].
pub struct WebAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl WebApp {
    pub(crate) fn new(
        sources: WebSources,
        token: Option<String>,
        actions: bool,
    ) -> EngineResult<Self> {
        // One worker thread drives the sockets and timers; callers block on their own request.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tasker-web-app")
            .enable_all()
            .build()
            .map_err(|e| {
                EngineError::Internal(format!("cannot start the web app's runtime: {e}"))
            })?;
        let state = {
            let _inside = runtime.enter();
            let state = Arc::new(WebState::new(sources, token, actions)?);
            runtime.spawn(sample_forever(Arc::clone(&state)));
            state
        };
        Ok(Self {
            runtime,
            router: routes::router(state),
        })
    }

    /// Answer one request. `script_name` is where the app is mounted (cookies are scoped to it).
    pub fn call(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> EngineResult<WebAnswer> {
        use tower::ServiceExt;
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(path_and_query);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request
            .body(axum::body::Body::from(body))
            .map_err(|e| EngineError::InvalidArgument(format!("request: {e}")))?;
        let router = self.router.clone();
        self.runtime.block_on(async move {
            let response = router
                .oneshot(request)
                .await
                .map_err(|e| EngineError::Internal(format!("web app: {e}")))?;
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
            let body = axum::body::to_bytes(response.into_body(), 64 << 20)
                .await
                .map_err(|e| EngineError::Internal(format!("web app body: {e}")))?;
            Ok(WebAnswer {
                status,
                headers,
                body: body.to_vec(),
            })
        })
    }
}
