//! Worker state and counters, shared lock-free between the engine thread and status readers.

use crate::config::{BackendKind, DeploymentMode};
use crate::metrics::Metrics;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerState {
    Starting = 0,
    Running = 1,
    ShuttingDown = 2,
    Stopped = 3,
    Error = 4,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::ShuttingDown => "shutting_down",
            Self::Stopped => "stopped",
            Self::Error => "error",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Starting,
            1 => Self::Running,
            2 => Self::ShuttingDown,
            3 => Self::Stopped,
            _ => Self::Error,
        }
    }
}

pub struct Shared {
    pub worker_id: String,
    pub environment: String,
    pub backend: BackendKind,
    pub deployment_mode: DeploymentMode,
    pub concurrency: usize,
    pub namespaces: Vec<String>,
    pub started_at: Instant,
    state: AtomicU8,
    /// Quiet (see `EngineMessage::Quiet`): running, but starting no step.
    quiet: AtomicBool,
    /// Attempts that ended (completed, failed or timed out) and were recorded.
    pub steps_processed: AtomicU64,
    /// Of those, the ones that did not succeed (including attempts that were retried).
    pub steps_failed: AtomicU64,
    /// Attempts handed to Ruby (or queued for it) and not yet recorded.
    pub in_flight: AtomicU64,
    pool_size: AtomicU32,
    pool_idle: AtomicU32,
    /// Where the web API listens, if it was enabled.
    pub web_api_bind: Option<std::net::SocketAddr>,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn new(
        worker_id: String,
        environment: String,
        backend: BackendKind,
        deployment_mode: DeploymentMode,
        concurrency: usize,
        namespaces: Vec<String>,
    ) -> Self {
        Self {
            worker_id,
            environment,
            backend,
            deployment_mode,
            concurrency,
            namespaces,
            started_at: Instant::now(),
            state: AtomicU8::new(WorkerState::Starting as u8),
            quiet: AtomicBool::new(false),
            steps_processed: AtomicU64::new(0),
            steps_failed: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            pool_size: AtomicU32::new(0),
            pool_idle: AtomicU32::new(0),
            web_api_bind: None,
            metrics: Arc::new(Metrics::new()),
        }
    }

    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, state: WorkerState) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Acquire)
    }

    pub fn set_quiet(&self, quiet: bool) {
        self.quiet.store(quiet, Ordering::Release);
    }

    pub fn pool_stats(&self) -> (u32, u32) {
        (
            self.pool_size.load(Ordering::Relaxed),
            self.pool_idle.load(Ordering::Relaxed),
        )
    }

    pub fn set_pool_stats(&self, (size, idle): (u32, u32)) {
        self.pool_size.store(size, Ordering::Relaxed);
        self.pool_idle.store(idle, Ordering::Relaxed);
    }

    pub fn status(&self) -> WorkerSystemStatus {
        let state = self.state();
        WorkerSystemStatus {
            running: matches!(state, WorkerState::Running | WorkerState::ShuttingDown),
            state,
            quiet: self.is_quiet(),
            worker_id: self.worker_id.clone(),
            environment: self.environment.clone(),
            backend: self.backend.as_str(),
            deployment_mode: self.deployment_mode.as_str(),
            concurrency: self.concurrency,
            uptime_seconds: self.started_at.elapsed().as_secs_f64(),
            steps_processed: self.steps_processed.load(Ordering::Acquire),
            steps_failed: self.steps_failed.load(Ordering::Acquire),
            steps_in_flight: self.in_flight.load(Ordering::Acquire),
            supported_namespaces: self.namespaces.clone(),
            web_api_enabled: self.web_api_bind.is_some(),
            web_api_bind: self.web_api_bind,
            database_pool_size: self.pool_size.load(Ordering::Relaxed),
            database_pool_idle: self.pool_idle.load(Ordering::Relaxed),
        }
    }
}

/// What `worker_status` reports.
#[derive(Debug, Clone)]
pub struct WorkerSystemStatus {
    pub running: bool,
    pub state: WorkerState,
    /// Starting no step until resumed (TSTP in the worker command).
    pub quiet: bool,
    pub worker_id: String,
    pub environment: String,
    pub backend: &'static str,
    pub deployment_mode: &'static str,
    pub concurrency: usize,
    pub uptime_seconds: f64,
    pub steps_processed: u64,
    pub steps_failed: u64,
    pub steps_in_flight: u64,
    pub supported_namespaces: Vec<String>,
    pub web_api_enabled: bool,
    /// Where the web API listens (the real port if `web_api_bind` asked for port 0).
    pub web_api_bind: Option<std::net::SocketAddr>,
    pub database_pool_size: u32,
    pub database_pool_idle: u32,
}
