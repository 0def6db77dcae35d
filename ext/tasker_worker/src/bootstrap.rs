//! Starting and stopping the worker system. `WorkerBootstrap::start` spawns the engine thread
//! (which owns the tokio runtime and the backend) and returns a handle at once; the caller
//! waits on [`WorkerSystemHandle::started`] and [`WorkerSystemHandle::stopped`] however
//! suits it (the Ruby bridge waits with the GVL released).

use crate::attempt::{AttemptOutcome, Phase, MAX_RETRY_AFTER};
use crate::backend::memory::{self, LocalTasks, MemoryBackend, NewTask};
use crate::backend::postgres::{PostgresBackend, PostgresSettings};
use crate::backend::{Backend, Notification};
use crate::config::{BackendKind, WorkerConfig};
use crate::dispatch::{self, DispatchPort, InFlightRegistry, InterruptPort};
use crate::engine::{Engine, EngineMessage};
use crate::error::{EngineError, EngineResult};
use crate::events::{StepExecutionCompletionEvent, TaskSnapshot};
use crate::status::{Shared, WorkerState, WorkerSystemStatus};
use crate::task_list::{TaskPage, TaskQuery};
use crate::template::{HandlerReference, TaskTemplate, TemplateKey, TemplateRegistry};
use crate::web::{BoundListener, WebApp, WebServer, WebSources};
use crossbeam_channel::{Receiver, Select, Sender};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tracing::warn;
use uuid::Uuid;

pub struct WorkerBootstrap;

impl WorkerBootstrap {
    /// Validate templates and namespaces, then start the engine thread.
    pub fn start(config: WorkerConfig) -> EngineResult<WorkerSystemHandle> {
        let (templates, namespaces) = Self::templates(&config)?;
        let templates = Arc::new(templates);
        // Only once the configuration is known to be good: a refused bootstrap changes nothing.
        crate::logging::configure(config.log_format, config.log_output.clone())?;
        if let Some(level) = config.log_level {
            crate::logging::set_level(level);
        }
        // Bound before anything starts, so that a port in use fails the bootstrap at once.
        let web = config
            .web_api
            .clone()
            .map(BoundListener::bind)
            .transpose()?;
        let mut shared = Shared::new(
            config.worker_id.clone(),
            config.environment.clone(),
            config.backend,
            config.deployment_mode,
            config.concurrency,
            namespaces,
        );
        shared.web_api_bind = web.as_ref().map(BoundListener::local_addr);
        let shared = Arc::new(shared);
        let task_ends = crossbeam_channel::unbounded();
        // Whether the database backend announces the tasks it finishes (the memory backend keeps
        // its own flag in its task table).
        let announce_ends = Arc::new(AtomicBool::new(false));
        let handle = match config.backend {
            BackendKind::Memory => {
                let local = Arc::new(LocalTasks::new(
                    config.task_retention,
                    config.task_index_retention,
                    task_ends.0.clone(),
                ));
                let backend = MemoryBackend::new(Arc::clone(&local));
                Self::spawn(backend, config, templates, shared, Some(local), task_ends)
            }
            BackendKind::Postgres => {
                let settings = PostgresSettings {
                    url: config.database_url.clone().unwrap_or_default(),
                    pool_size: config.database_pool_size,
                    worker_id: config.worker_id.clone(),
                    namespaces: shared.namespaces.clone(),
                    mode: config.deployment_mode,
                    poll_interval: config.poll_interval,
                    finished_task_ttl: config.finished_task_ttl,
                    claim_lease: config.claim_lease,
                    // Each thread's next step waiting, at least; at most every queued attempt
                    // plus one running on each thread.
                    min_in_flight: config.concurrency * 2,
                    max_in_flight: dispatch_capacity(&config) + config.concurrency,
                    task_ends: task_ends.0.clone(),
                    announce_ends: Arc::clone(&announce_ends),
                };
                let backend = PostgresBackend::new(settings, Arc::clone(&templates));
                Self::spawn(backend, config, templates, shared, None, task_ends).map(
                    |mut handle| {
                        handle.announce_ends = Some(announce_ends);
                        handle
                    },
                )
            }
        }?;
        if let Some(bound) = web {
            let server = WebServer::start(bound, handle.web_sources())?;
            *handle.web.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
        }
        Ok(handle)
    }

    /// The handler classes a worker started with `config` would call: every step of the local
    /// templates in the namespaces it would run. Loads the templates as [`Self::start`] does and
    /// starts nothing, so a caller can check the handlers before starting the worker.
    pub fn handler_references(config: &WorkerConfig) -> EngineResult<Vec<HandlerReference>> {
        let (templates, namespaces) = Self::templates(config)?;
        Ok(templates.handlers_in(&namespaces))
    }

    /// The templates and namespaces a worker started with `config` would run, loaded and
    /// validated as [`Self::start`] does, starting nothing (test mode runs tasks from them).
    /// The callables of the steps it runs are checked by the bridge's rule; the others belong to
    /// other workers (on PostgreSQL, maybe in another language).
    pub fn templates(config: &WorkerConfig) -> EngineResult<(TemplateRegistry, Vec<String>)> {
        let templates = TemplateRegistry::load(&config.templates)?;
        let namespaces = Self::namespaces(config, &templates)?;
        templates.check_callables(&namespaces, config.callable_rule)?;
        Ok((templates, namespaces))
    }

    /// The namespaces the worker runs: the configured ones (on the memory backend each must have a
    /// template or a step, and every step of the tasks it runs must be in one; on postgres other
    /// processes may hold them), or every loaded template's and step's.
    fn namespaces(
        config: &WorkerConfig,
        templates: &TemplateRegistry,
    ) -> EngineResult<Vec<String>> {
        let Some(list) = &config.namespaces else {
            return Ok(templates.namespaces());
        };
        if config.backend == BackendKind::Memory {
            let known = templates.namespaces();
            if let Some(missing) = list.iter().find(|n| !known.contains(n)) {
                return Err(EngineError::config(format!(
                    "namespaces: no template in namespace {missing:?} (templates loaded: {})",
                    templates.describe_known()
                )));
            }
            // One process runs every step of its tasks: a step left to other workers would
            // keep its task waiting forever.
            let mut runs: Vec<&Arc<TaskTemplate>> = templates
                .iter()
                .filter(|t| list.contains(&t.namespace))
                .collect();
            runs.sort_by_key(|t| t.key());
            for template in runs {
                if let Some(step) = template.steps_outside(list).next() {
                    return Err(EngineError::config(format!(
                        "namespaces: step `{}` of {} runs in namespace {:?}, which this worker does not run \
                         (namespaces: {list:?}); on the memory backend one process runs every step of its tasks",
                        step.name,
                        template.key(),
                        step.namespace
                    )));
                }
            }
        }
        Ok(list.clone())
    }

    fn spawn<B: Backend>(
        mut backend: B,
        config: WorkerConfig,
        templates: Arc<TemplateRegistry>,
        shared: Arc<Shared>,
        local: Option<Arc<LocalTasks>>,
        (_task_ends_tx, task_ends): (Sender<TaskSnapshot>, Receiver<TaskSnapshot>),
    ) -> EngineResult<WorkerSystemHandle> {
        let capacity = dispatch_capacity(&config);
        backend.set_metrics(Arc::clone(&shared.metrics));
        let (dispatch_tx, dispatch_rx) = dispatch::channel(capacity);
        let (closed_tx, closed_rx) = crossbeam_channel::bounded::<()>(0);
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        let (inbox_tx, inbox_rx) = unbounded_channel();
        let registry = Arc::new(InFlightRegistry::default());
        // Bounded: without a Ruby thread raising them, interrupts are dropped, not piled up.
        let (interrupts_tx, interrupts_rx) = crossbeam_channel::bounded(1024);
        let engine = Engine {
            backend,
            shared: Arc::clone(&shared),
            registry: Arc::clone(&registry),
            inbox: inbox_rx,
            inbox_sender: inbox_tx.clone(),
            dispatch: dispatch_tx,
            recall: dispatch_rx.clone(),
            interrupts: interrupts_tx,
            dispatch_capacity: capacity,
            shutdown_timeout: config.shutdown_timeout,
            closed: Some(closed_tx),
        };
        let needs_io = config.backend != BackendKind::Memory;
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tasker-engine".into())
            .spawn(move || {
                let mut builder = tokio::runtime::Builder::new_current_thread();
                builder.enable_time();
                if needs_io {
                    builder.enable_io();
                }
                let runtime = match builder.build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        thread_shared.set_state(WorkerState::Error);
                        let _ = started_tx.send(Err(EngineError::Bootstrap(format!(
                            "cannot start tokio runtime: {e}"
                        ))));
                        return;
                    }
                };
                let run = std::panic::AssertUnwindSafe(|| runtime.block_on(engine.run(started_tx)));
                if std::panic::catch_unwind(run).is_err() {
                    thread_shared.set_state(WorkerState::Error);
                    tracing::error!("the engine thread panicked; the worker is in state error");
                }
                // The worker's last lines are written before its stop returns.
                crate::logging::flush();
            })
            .map_err(|e| EngineError::Bootstrap(format!("cannot spawn the engine thread: {e}")))?;

        Ok(WorkerSystemHandle {
            shared,
            inbox: inbox_tx,
            port: DispatchPort::new(dispatch_rx, closed_rx.clone()),
            interrupt_port: InterruptPort::new(interrupts_rx, closed_rx.clone()),
            registry,
            templates,
            local,
            announce_ends: None,
            task_ends,
            started: started_rx,
            stopped: closed_rx,
            thread: Mutex::new(Some(thread)),
            pid: std::process::id(),
            draining: AtomicBool::new(false),
            web: Mutex::new(None),
            database_url: config.database_url.clone(),
        })
    }
}

/// A pending `wait_for_task`: receive the answer from `answer`.
pub struct WaitTicket {
    task_uuid: Uuid,
    reply: crossbeam_channel::Sender<EngineResult<TaskSnapshot>>,
    abandoned: Arc<AtomicBool>,
    pub answer: Receiver<EngineResult<TaskSnapshot>>,
}

/// What a thread waiting for task ends gets back ([`WorkerSystemHandle::next_task_end`]).
#[derive(Debug)]
pub enum TaskEndTake {
    /// A task finished: its final status.
    End(Box<TaskSnapshot>),
    /// The wait timed out or was cut short.
    Nothing,
    /// The worker stopped and every end was delivered.
    Closed,
}

/// What happened to a completion handed to [`WorkerSystemHandle::complete`].
#[derive(Debug, PartialEq, Eq)]
pub enum CompletionVerdict {
    Accepted,
    /// Unknown, late (worker stopped) or already completed: nothing changed.
    Refused(String),
    /// The attempt had timed out while its handler ran: it is now recorded as timed out (the
    /// next attempt may start) and the handler's result is discarded.
    TimedOut(String),
}

pub struct WorkerSystemHandle {
    shared: Arc<Shared>,
    inbox: UnboundedSender<EngineMessage>,
    port: DispatchPort,
    interrupt_port: InterruptPort,
    registry: Arc<InFlightRegistry>,
    templates: Arc<TemplateRegistry>,
    /// The memory backend's task table, which the task API reads and writes without the engine.
    local: Option<Arc<LocalTasks>>,
    /// The database backend's switch for announcing the tasks it finishes.
    announce_ends: Option<Arc<AtomicBool>>,
    /// Finished tasks, while someone observes them ([`Self::announce_task_ends`]).
    task_ends: Receiver<TaskSnapshot>,
    started: Receiver<EngineResult<()>>,
    stopped: Receiver<()>,
    thread: Mutex<Option<JoinHandle<()>>>,
    pid: u32,
    /// Set (synchronously, before the engine hears of it) once a graceful shutdown or a stop is
    /// requested: from then on no new step is handed to a handler thread (see [`Self::is_draining`]).
    draining: AtomicBool,
    /// The HTTP endpoint, if enabled: stopped (its socket closed) by [`Self::join`].
    web: Mutex<Option<WebServer>>,
    /// For the web routes' own connections (PostgreSQL).
    database_url: Option<String>,
}

impl WorkerSystemHandle {
    /// Receives once: `Ok` when the engine runs, or why it could not start.
    pub fn started(&self) -> &Receiver<EngineResult<()>> {
        &self.started
    }

    /// Disconnects when the engine loop has ended.
    pub fn stopped(&self) -> &Receiver<()> {
        &self.stopped
    }

    /// The process that started this worker (a forked child must not use it).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn is_running(&self) -> bool {
        matches!(
            self.shared.state(),
            WorkerState::Running | WorkerState::ShuttingDown
        )
    }

    pub fn state(&self) -> WorkerState {
        self.shared.state()
    }

    pub fn status(&self) -> WorkerSystemStatus {
        self.shared.status()
    }

    pub fn port(&self) -> &DispatchPort {
        &self.port
    }

    /// Where handler interrupts (timeouts, cancels) arrive: one Ruby thread takes them and
    /// raises into the handler thread running the event.
    pub fn interrupt_port(&self) -> &InterruptPort {
        &self.interrupt_port
    }

    pub fn templates(&self) -> &TemplateRegistry {
        &self.templates
    }

    fn web_sources(&self) -> WebSources {
        WebSources {
            shared: Arc::clone(&self.shared),
            registry: Arc::clone(&self.registry),
            inbox: self.inbox.clone(),
            templates: Arc::clone(&self.templates),
            database_url: self.database_url.clone(),
        }
    }

    /// The web routes (dashboard and API) for requests handed over by a Rack app rather than
    /// received on `web_api_bind`; `token` and `actions` as `web_api_token` and `web_api_actions`.
    pub fn web_app(&self, token: Option<String>, actions: bool) -> EngineResult<WebApp> {
        WebApp::new(self.web_sources(), token, actions)
    }

    fn send(&self, message: EngineMessage) -> EngineResult<()> {
        self.inbox
            .send(message)
            .map_err(|_| EngineError::NotInitialized)
    }

    /// Stop dispatching; in-flight steps finish and are recorded. The state reads `shutting_down`
    /// once the engine has recalled the queued steps (the bridge waits for that).
    pub fn transition_to_graceful_shutdown(&self) -> EngineResult<()> {
        self.draining.store(true, Ordering::Release);
        self.send(EngineMessage::GracefulShutdown)
    }

    /// Start no step until [`Self::resume`]; running steps finish, queued ones go back to the
    /// backend (on PostgreSQL other workers may take them). [`Self::is_quiet`] says when it is done.
    pub fn quiet(&self) -> EngineResult<()> {
        self.send(EngineMessage::Quiet)
    }

    /// Start steps again after [`Self::quiet`].
    pub fn resume(&self) -> EngineResult<()> {
        self.send(EngineMessage::Resume)
    }

    pub fn is_quiet(&self) -> bool {
        self.shared.is_quiet()
    }

    /// Ask the engine to drain and stop; wait on [`Self::stopped`], then call [`Self::join`].
    pub fn request_stop(&self) {
        self.draining.store(true, Ordering::Release);
        let _ = self.send(EngineMessage::Stop);
    }

    /// True once a shutdown was requested. The engine recalls queued events only when it
    /// processes that request; until then a handler thread could still take one, so takers
    /// check this after taking and hand such an event back with [`Self::release_untaken`].
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether an event's attempt is still out (queued, running, or timed out and waiting for
    /// its handler to return).
    pub fn is_in_flight(&self, event_id: Uuid) -> bool {
        self.registry.contains(event_id)
    }

    /// A handler thread took `event_id` and is about to run it; its timeout counts from now.
    /// False if it must not run: it waited its whole timeout for a thread and was handed back
    /// (it may already run elsewhere), or was withdrawn (its task was cancelled or failed).
    pub fn begin_running(&self, event_id: Uuid) -> bool {
        self.registry
            .with(event_id, |flight| {
                let began = flight.begin_running();
                if began {
                    if let Some(metrics) =
                        flight.metrics.as_ref().filter(|_| flight.ready_at_ns > 0)
                    {
                        let waited = crate::events::unix_ns().saturating_sub(flight.ready_at_ns);
                        metrics.started(flight.attempt, Duration::from_nanos(waited));
                    }
                }
                began
            })
            .unwrap_or(false)
    }

    /// Give back an event taken from the dispatch channel that will not run: the attempt does
    /// not count, and the step stays ready (the engine's recall, for an event already taken).
    pub fn release_untaken(&self, event_id: Uuid) {
        self.hand_back(event_id);
    }

    /// Give back an attempt whose handler is being stopped (a shutdown past its deadline): the
    /// attempt does not count and the step is ready again (on PostgreSQL, for other workers).
    /// A completion arriving later for it is refused. False if the attempt had already ended.
    pub fn hand_back(&self, event_id: Uuid) -> bool {
        match self.registry.take(event_id) {
            Some(flight) => {
                flight.phase.finish();
                let _ = self.send(EngineMessage::Release(flight));
                true
            }
            None => false,
        }
    }

    /// Join the engine thread (immediate once [`Self::stopped`] has disconnected).
    pub fn join(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                warn!("engine thread ended by panic");
            }
        }
        // The server stops with the worker: once this returns, nothing listens any more.
        let web = self.web.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut web) = web {
            web.stop();
        }
    }

    /// Accept or refuse a completion without blocking (never waits for the engine).
    ///
    /// The completion of an attempt that timed out while its handler ran is refused (the
    /// handler's result is discarded) but ends the attempt: it is recorded as timed out, and
    /// the next attempt may start. After a cancel, what the handler reported is recorded (a
    /// success stays a success; anything else leaves the step cancelled).
    /// A `retry_after` above [`MAX_RETRY_AFTER`] waits that long (no `Instant` overflow).
    pub fn complete(&self, mut completion: StepExecutionCompletionEvent) -> CompletionVerdict {
        completion.retry_after = completion.retry_after.map(|d| d.min(MAX_RETRY_AFTER));
        let event_id = completion.event_id;
        let checked = self.registry.with(event_id, |flight| {
            if flight.task_uuid != completion.task_uuid || flight.step_uuid != completion.step_uuid {
                return Err(format!(
                    "completion for event {event_id} names task {} / step {}, but the event belongs to task {} / step {}",
                    completion.task_uuid, completion.step_uuid, flight.task_uuid, flight.step_uuid
                ));
            }
            // A handler that returns after its deadline has timed out, whether or not the engine's
            // sweep got there first (a busy engine thread, a slow database call): its success
            // must not count.
            if Instant::now() >= flight.deadline() {
                flight.phase.advance(Phase::Running, Phase::TimedOut);
            }
            // Exactly one of completion, timeout sweep, cancel and recall moves the phase on.
            Ok((
                flight.phase.finish(),
                (flight.task_uuid, Arc::clone(&flight.step_name), flight.attempt),
            ))
        });
        let (phase, (task_uuid, step_name, attempt)) = match checked {
            None => {
                return CompletionVerdict::Refused(format!(
                    "completion for unknown, late or already completed event {event_id}"
                ))
            }
            Some(Err(why)) => return CompletionVerdict::Refused(why),
            Some(Ok(found)) => found,
        };
        let (outcome, verdict) = match phase {
            Some(Phase::Queued | Phase::Running) => (
                AttemptOutcome::Completed(Box::new(completion)),
                CompletionVerdict::Accepted,
            ),
            Some(Phase::Cancelled) => (
                AttemptOutcome::Cancelled(Some(Box::new(completion))),
                CompletionVerdict::Accepted,
            ),
            Some(Phase::TimedOut) => (
                AttemptOutcome::TimedOut,
                CompletionVerdict::TimedOut(format!(
                    "completion for event {event_id} (task {task_uuid}, step {step_name}, attempt {attempt}) arrived after the attempt timed out; \
                     recorded as timed out, its result discarded"
                )),
            ),
            Some(Phase::Done) | None => {
                return CompletionVerdict::Refused(format!(
                    "completion for event {event_id} arrived after its attempt ended"
                ))
            }
        };
        let Some(flight) = self.registry.take(event_id) else {
            return CompletionVerdict::Refused(format!(
                "completion for event {event_id} arrived after its attempt ended"
            ));
        };
        match self.send(EngineMessage::Outcome(flight, outcome)) {
            Ok(()) => verdict,
            Err(_) => CompletionVerdict::Refused(format!(
                "completion for event {event_id} arrived after the worker stopped"
            )),
        }
    }

    /// Ask the engine to cancel a task; the answer says whether it was still unfinished.
    pub fn request_cancel_task(
        &self,
        task_uuid: Uuid,
    ) -> EngineResult<Receiver<EngineResult<bool>>> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(EngineMessage::CancelTask { task_uuid, reply })?;
        Ok(answer)
    }

    /// Ask the engine to run an `error` or `cancelled` task again from its unfinished steps.
    pub fn request_retry_task(&self, task_uuid: Uuid) -> EngineResult<Receiver<EngineResult<()>>> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(EngineMessage::RetryTask { task_uuid, reply })?;
        Ok(answer)
    }

    /// Check what can be checked at once (a bad name fails here, on the caller's thread), then ask
    /// the engine to create the task. With postgres, templates that other processes stored count too.
    pub fn request_create_task(
        &self,
        namespace: &str,
        name: &str,
        version: &str,
        context: Value,
    ) -> EngineResult<Receiver<EngineResult<Vec<Uuid>>>> {
        if !context.is_object() {
            return Err(EngineError::config("context: must be a Hash"));
        }
        self.request_create_tasks(namespace, name, version, vec![context], None)
    }

    /// [`Self::request_create_task`] for many tasks of one template at once: one message, and on
    /// postgres one transaction. The answer lists the new tasks' uuids in the order of `contexts`.
    /// On the memory backend the tasks are created at once, on this thread, and the answer is
    /// already there.
    pub fn request_create_tasks(
        &self,
        namespace: &str,
        name: &str,
        version: &str,
        contexts: Vec<Value>,
        run_at: Option<SystemTime>,
    ) -> EngineResult<Receiver<EngineResult<Vec<Uuid>>>> {
        Self::check_contexts(&contexts)?;
        let (reply, answer) = crossbeam_channel::bounded(1);
        if let Some(local) = &self.local {
            let template = self.local_template(namespace, name, version)?;
            let prepared = Self::prepare_tasks(&template, contexts, run_at);
            let _ = reply.try_send(local.access(|table| table.insert(prepared)));
            self.tasks_inserted();
            return Ok(answer);
        }
        let key = TemplateKey {
            namespace: namespace.into(),
            name: name.into(),
            version: version.into(),
        };
        let template = self.templates.get(namespace, name, version).map(Arc::clone);
        if contexts.is_empty() {
            let _ = reply.try_send(Ok(Vec::new()));
            return Ok(answer);
        }
        self.send(EngineMessage::CreateTasks {
            key,
            template,
            contexts,
            run_at,
            reply,
        })?;
        Ok(answer)
    }

    pub fn check_contexts(contexts: &[Value]) -> EngineResult<()> {
        match contexts.iter().position(|c| !c.is_object()) {
            Some(i) => Err(EngineError::config(format!(
                "contexts[{i}]: must be a Hash"
            ))),
            None => Ok(()),
        }
    }

    /// The memory backend's task table, which callers use directly (no engine round trip):
    /// `None` on a database backend.
    pub fn local_tasks(&self) -> Option<&LocalTasks> {
        self.local.as_deref()
    }

    /// The template a new task of the memory backend runs, checked the way creation checks it:
    /// known, and of a namespace this worker runs (templates do not change while a worker runs,
    /// so this holds until the task is inserted).
    pub fn local_template(
        &self,
        namespace: &str,
        name: &str,
        version: &str,
    ) -> EngineResult<Arc<TaskTemplate>> {
        let Some(template) = self.templates.get(namespace, name, version) else {
            return Err(EngineError::config(format!(
                "unknown template {namespace}/{name}@{version} (known: {})",
                self.templates.describe_known()
            )));
        };
        // In one process, a task of a namespace nobody runs would wait forever.
        if !self.shared.namespaces.iter().any(|n| n == namespace) {
            return Err(EngineError::config(format!(
                "namespace {namespace:?} is not handled by this worker (namespaces: {:?})",
                self.shared.namespaces
            )));
        }
        if self.is_draining() {
            return Err(EngineError::ShuttingDown);
        }
        Ok(Arc::clone(template))
    }

    /// New memory-backend tasks, built outside the table's lock (checked by
    /// [`Self::check_contexts`] first).
    /// `run_at`: when their root steps become ready (see [`NewTask::scheduled_for`]).
    pub fn prepare_tasks(
        template: &Arc<TaskTemplate>,
        contexts: Vec<Value>,
        run_at: Option<SystemTime>,
    ) -> Vec<NewTask> {
        memory::prepare_tasks(template, contexts, run_at)
    }

    /// Memory-backend tasks were inserted into the table: wake the engine to claim their steps,
    /// unless a wake is already on its way.
    pub fn tasks_inserted(&self) {
        if self.local.as_ref().is_some_and(|local| local.needs_wake()) {
            let _ = self.send(EngineMessage::Notify(Notification::StepsReady));
        }
    }

    /// One page of tasks, newest first (see [`TaskQuery`]).
    pub fn request_list_tasks(
        &self,
        query: TaskQuery,
    ) -> EngineResult<Receiver<EngineResult<TaskPage>>> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(EngineMessage::ListTasks { query, reply })?;
        Ok(answer)
    }

    pub fn request_task_status(
        &self,
        task_uuid: Uuid,
    ) -> EngineResult<Receiver<EngineResult<TaskSnapshot>>> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        if let Some(local) = &self.local {
            let _ = reply.try_send(local.access(|table| table.snapshot(task_uuid)));
            return Ok(answer);
        }
        self.send(EngineMessage::TaskStatus { task_uuid, reply })?;
        Ok(answer)
    }

    /// Ask to be answered when the task finishes. A caller that stops waiting first (timeout,
    /// interrupt) must hand the ticket to [`Self::abandon_wait`], or the engine keeps its reply.
    pub fn request_wait_for_task(&self, task_uuid: Uuid) -> EngineResult<WaitTicket> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let abandoned = Arc::new(AtomicBool::new(false));
        if let Some(local) = &self.local {
            if let Some(now) = local.access(|table| table.wait(task_uuid, &reply)) {
                let _ = reply.try_send(now);
            }
            return Ok(WaitTicket {
                task_uuid,
                reply,
                abandoned,
                answer,
            });
        }
        self.send(EngineMessage::WaitForTask {
            task_uuid,
            reply: reply.clone(),
            abandoned: Arc::clone(&abandoned),
        })?;
        Ok(WaitTicket {
            task_uuid,
            reply,
            abandoned,
            answer,
        })
    }

    /// Announce finished tasks to [`Self::next_task_end`] from now on (`true`), or stop. The
    /// memory backend announces every task; PostgreSQL the tasks this process finished (each
    /// task's end is announced once, by the process whose write finished it).
    pub fn announce_task_ends(&self, announce: bool) -> bool {
        match (&self.local, &self.announce_ends) {
            (Some(local), _) => {
                local.set_announce_ends(announce);
                true
            }
            (None, Some(flag)) => {
                flag.store(announce, Ordering::Release);
                true
            }
            (None, None) => false,
        }
    }

    /// Block until a task announced as finished arrives (see [`Self::announce_task_ends`]), the
    /// worker stops with none left, `cancel` receives, or `timeout` passes.
    pub fn next_task_end(&self, cancel: &Receiver<()>, timeout: Option<Duration>) -> TaskEndTake {
        if let Ok(snapshot) = self.task_ends.try_recv() {
            return TaskEndTake::End(Box::new(snapshot));
        }
        let mut select = Select::new();
        // A backend that never announces dropped its sender: wait for the others only.
        let announces = self.local.is_some() || self.announce_ends.is_some();
        let ends = announces.then(|| select.recv(&self.task_ends));
        let closed = select.recv(&self.stopped);
        select.recv(cancel);
        let op = match timeout {
            Some(t) => match select.select_timeout(t) {
                Ok(op) => op,
                Err(_) => return TaskEndTake::Nothing,
            },
            None => select.select(),
        };
        match op.index() {
            i if Some(i) == ends => match op.recv(&self.task_ends) {
                Ok(snapshot) => TaskEndTake::End(Box::new(snapshot)),
                Err(_) => TaskEndTake::Closed,
            },
            i if i == closed => {
                let _ = op.recv(&self.stopped);
                // Ends announced before the stop are still delivered.
                match self.task_ends.try_recv() {
                    Ok(snapshot) => TaskEndTake::End(Box::new(snapshot)),
                    Err(_) => TaskEndTake::Closed,
                }
            }
            _ => {
                let _ = op.recv(cancel);
                TaskEndTake::Nothing
            }
        }
    }

    /// The waiter gave up: the engine forgets it.
    pub fn abandon_wait(&self, ticket: WaitTicket) {
        if let Some(local) = &self.local {
            local.access(|table| table.forget_waiter(ticket.task_uuid, &ticket.reply));
            return;
        }
        ticket.abandoned.store(true, Ordering::Release);
        let _ = self.send(EngineMessage::ForgetWaiter {
            task_uuid: ticket.task_uuid,
            reply: ticket.reply,
        });
    }
}

impl Drop for WorkerSystemHandle {
    fn drop(&mut self) {
        // Never leave an engine thread running unowned: ask it to stop. Not waiting here,
        // since the last owner may be a thread that must not block (the bridge waits explicitly).
        if self.pid == std::process::id() {
            self.request_stop();
        }
    }
}

/// How many claimed attempts may wait in the dispatch channel for a handler thread.
///
/// Memory: room for every handler thread to find its next step waiting, and no more: steps stay
/// in the backend (ordered, recallable) until a thread is about to need them. PostgreSQL: a
/// database round trip claims a batch, so give it room to amortise: each transaction then
/// carries up to this many claims and completions (how many the backend claims follows how fast
/// steps finish, up to this). An attempt's timeout runs from when a thread takes it; one that
/// waited a whole timeout for a thread goes back unrun, its attempt not counted (see
/// `InFlight::deadline`). On shutdown the queued ones are released at once.
fn dispatch_capacity(config: &WorkerConfig) -> usize {
    match config.backend {
        BackendKind::Memory => config.concurrency * 2,
        BackendKind::Postgres => (config.concurrency * 4).max(128),
    }
}
