//! The worker's HTTP endpoint (`enable_web_api: true`): health, readiness, status and Prometheus
//! metrics.
//!
//! It runs on a thread of its own with its own tokio runtime, not on the engine's: the engine
//! thread may be busy for a while (a burst of in-process completions never yields to other
//! tasks), and a probe must answer regardless. Nothing here touches Ruby, so a handler thread
//! holding the GVL cannot delay an answer either. The listener is bound synchronously when the
//! worker starts (a port in use fails the bootstrap, naming the address) and closed before
//! `stop_worker` returns.

mod routes;

use crate::config::WebApiConfig;
use crate::dispatch::InFlightRegistry;
use crate::engine::EngineMessage;
use crate::error::{EngineError, EngineResult};
use crate::status::Shared;
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
    pub database: Option<PgPool>,
    pub token: Option<String>,
    /// One scrape at a time fills and encodes the gauges.
    pub scrape: tokio::sync::Mutex<()>,
}

/// The running server; stopping it (or dropping it) closes the listener.
pub struct WebServer {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    address: SocketAddr,
}

impl WebServer {
    pub(crate) fn start(
        bound: BoundListener,
        shared: Arc<Shared>,
        registry: Arc<InFlightRegistry>,
        inbox: UnboundedSender<EngineMessage>,
        database_url: Option<&str>,
    ) -> EngineResult<Self> {
        let address = bound.local_addr();
        let database = database_url
            .map(|url| {
                PgConnectOptions::from_str(url)
                    .map(|options| options.application_name("tasker-web"))
                    .map_err(|e| EngineError::config(format!("database_url: {e}")))
            })
            .transpose()?;
        let token = bound.config.token.clone();
        // Built on the web thread: a pool belongs to the runtime it is created in.
        let state = move || WebState {
            shared,
            registry,
            inbox,
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
            scrape: tokio::sync::Mutex::new(()),
        };
        let (stop, stopped) = watch::channel(false);
        let listener = bound.listener;
        let thread = std::thread::Builder::new()
            .name("tasker-web".into())
            .spawn(move || serve(listener, state, stopped))
            .map_err(|e| EngineError::Bootstrap(format!("cannot spawn the web thread: {e}")))?;
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

fn serve(listener: TcpListener, state: impl FnOnce() -> WebState, stopped: watch::Receiver<bool>) {
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
            let state = Arc::new(state());
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(e) => {
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
