//! The module runner: checks a start request, records the run, and executes
//! it through the task manager in a fresh, bounded sandbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Map, Value};
use wasmtime::Trap;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx};

use super::host::{EchoBudget, HostState, RunContext, RunLog};
use super::loader::{LoadedModule, ModuleHost};
use super::manifest::Grants;
use super::module_id::ModuleId;
use super::output::CappedOutput;
use crate::cluster::{Claimer, Versions};
use crate::error::{Error, Result};
use crate::handle::RunHandle;
use crate::line::Line;
use crate::manager::{BackgroundTaskManager, Failure, Gate, Permits, Room, TaskOutput};
use crate::registry::{Cleanup, Override, RunRegistry, ago};
use crate::run::{
    EXIT_FAILURE, EXIT_PANIC, EXIT_TIMEOUT, LogEntry, LogLevel, MAX_PARAMETERS_BYTES, Run,
    RunStatus, StartOptions, Transition, check_time, cut_to,
};
use crate::sync::LockUnpoisoned;

/// Starts runs of loaded modules as tracked tasks.
///
/// Cheap to clone: clones share the host, the manager and the per-module limits.
#[derive(Clone, Debug)]
pub struct ModuleRunner {
    host: ModuleHost,
    manager: BackgroundTaskManager,
    gates: Arc<Mutex<Gates>>,
    /// Set once this runner takes its runs from a queue several nodes
    /// share ([`claim_from_queue`](Self::claim_from_queue)): the module
    /// versions its queued runs may need.
    queue: Arc<OnceLock<Arc<Versions>>>,
}

/// What runs wait on before they start: the engine's pool of instances
/// (every run), and a module's own `max_concurrent` where it has one.
#[derive(Debug)]
struct Gates {
    /// For modules without a limit of their own: the pool alone.
    pool: Arc<Gate>,
    /// Per module with a limit: that limit, and its semaphore then the pool.
    modules: HashMap<String, (usize, Arc<Gate>)>,
}

impl ModuleRunner {
    /// A runner of `host`'s modules, through `manager`.
    #[must_use]
    pub fn new(host: ModuleHost, manager: BackgroundTaskManager) -> ModuleRunner {
        let pool = Arc::new(Gate {
            first: None,
            then: Some(host.instance_pool()),
        });
        ModuleRunner {
            host,
            manager,
            gates: Arc::new(Mutex::new(Gates {
                pool,
                modules: HashMap::new(),
            })),
            queue: Arc::new(OnceLock::new()),
        }
    }

    /// The module host.
    #[must_use]
    pub fn host(&self) -> &ModuleHost {
        &self.host
    }

    /// The task manager.
    #[must_use]
    pub fn manager(&self) -> &BackgroundTaskManager {
        &self.manager
    }

    /// The registry runs are recorded in.
    #[must_use]
    pub fn registry(&self) -> &RunRegistry {
        self.manager.registry()
    }

    /// Starts a run of `module_id` with `parameters` (a JSON object, or null
    /// for none) and returns its id once it is recorded `Queued`.
    ///
    /// Once this runner [claims from a queue](Self::claim_from_queue), the
    /// run is recorded for whichever node claims it (this one or another),
    /// pinned to the module version loaded here now.
    ///
    /// An unknown module ([`Error::UnknownModule`]) or parameters that fail
    /// the module's schema ([`Error::InvalidParameters`]) record no run.
    pub async fn start(&self, module_id: &str, parameters: Value) -> Result<RunHandle> {
        self.start_with(module_id, parameters, &StartOptions::new())
            .await
    }

    /// [`start`](Self::start) with `options`: a [priority](StartOptions::priority)
    /// (higher starts first among the runs waiting for the same room), a
    /// [time before which it does not start](StartOptions::not_before)
    /// (the run waits `Queued` until then; on a registry nodes share, it
    /// is claimed within [`CLAIM_POLL`](crate::cluster::CLAIM_POLL) of
    /// that time), and an [idempotency key](Self::start_idempotent).
    ///
    /// A not-before time past the year 2262 is refused
    /// ([`Error::TimeOutOfRange`]). A start retried with an idempotency
    /// key answers the first start's run, whatever the options of either.
    pub async fn start_with(
        &self,
        module_id: &str,
        parameters: Value,
        options: &StartOptions,
    ) -> Result<RunHandle> {
        options.not_before.map(check_time).transpose()?;
        let run_id = match options.idempotency_key.as_deref() {
            None => self.start_keyed(module_id, parameters, options).await?,
            Some(key) => self.start_once(module_id, parameters, options, key).await?,
        };
        Ok(RunHandle::for_module(run_id, self))
    }

    /// A handle on run `run_id`, started before (by this process or an
    /// earlier one, or another node): it waits for the run's end, cancels
    /// it and follows its events, as the handle a start returns does.
    #[must_use]
    pub fn handle(&self, run_id: impl Into<String>) -> RunHandle {
        RunHandle::for_module(run_id.into(), self)
    }

    /// [`start`](Self::start), safe to retry: the first start with `key`
    /// records a run, and every later start with the same key, module and
    /// parameters returns that run's id without starting another, on any
    /// node sharing the registry, for as long as the run is kept.
    ///
    /// A key given before for another module or other parameters is
    /// refused ([`Error::IdempotencyKeyReused`]), as is a key that is
    /// empty, longer than 255 characters or holds control characters
    /// ([`Error::InvalidIdempotencyKey`]).
    pub async fn start_idempotent(
        &self,
        module_id: &str,
        parameters: Value,
        key: &str,
    ) -> Result<RunHandle> {
        let options = StartOptions::new().idempotency_key(key);
        self.start_with(module_id, parameters, &options).await
    }

    /// The run a start with `key` records, or the one an earlier start
    /// with it recorded.
    async fn start_once(
        &self,
        module_id: &str,
        parameters: Value,
        options: &StartOptions,
        key: &str,
    ) -> Result<String> {
        if key.is_empty() || key.chars().count() > 255 || key.chars().any(char::is_control) {
            return Err(Error::InvalidIdempotencyKey(key.to_owned()));
        }
        let earlier = match self.registry().run_by_key(key).await? {
            Some(earlier) => earlier,
            None => match self
                .start_keyed(module_id, parameters.clone(), options)
                .await
            {
                // Another start with the key was recorded first.
                Err(Error::IdempotencyKeyReused { run_id, .. }) => self
                    .registry()
                    .get_run(&run_id)
                    .await?
                    .ok_or(Error::RunNotFound(run_id))?,
                started => return started,
            },
        };
        let same_parameters = match &parameters {
            Value::Null => earlier.parameters.is_empty(),
            Value::Object(map) => *map == earlier.parameters,
            _ => false,
        };
        if earlier.module_id == module_id && same_parameters {
            Ok(earlier.run_id)
        } else {
            Err(Error::IdempotencyKeyReused {
                key: key.to_owned(),
                run_id: earlier.run_id,
            })
        }
    }

    async fn start_keyed(
        &self,
        module_id: &str,
        parameters: Value,
        options: &StartOptions,
    ) -> Result<String> {
        let key = options.idempotency_key.as_deref();
        let module_id = ModuleId::new(module_id)?;
        let module_id = module_id.as_str();
        let module = self
            .host
            .get(module_id)
            .ok_or_else(|| Error::UnknownModule(module_id.to_owned()))?;
        let parameters = match parameters {
            Value::Null => Map::new(),
            Value::Object(map) => map,
            other => {
                return Err(Error::InvalidParameters {
                    module_id: module_id.to_owned(),
                    problems: vec![format!(
                        "parameters must be a JSON object, not {}",
                        json_kind(&other)
                    )],
                });
            }
        };
        if longer_than(&parameters, MAX_PARAMETERS_BYTES) {
            return Err(Error::InvalidParameters {
                module_id: module_id.to_owned(),
                problems: vec![format!(
                    "parameters: more than {} of JSON, the most a run takes",
                    size_in_words(MAX_PARAMETERS_BYTES)
                )],
            });
        }
        let as_value = Value::Object(parameters);
        let problems: Vec<String> = module
            .validator
            .iter_errors(&as_value)
            .map(|error| {
                let path = error.instance_path().to_string();
                let field = if path.is_empty() {
                    "parameters".to_owned()
                } else {
                    path
                };
                // The schema's message quotes the value, whatever its size.
                cut_middle(format!("{field}: {error}"), MAX_PROBLEM)
            })
            .collect();
        if !problems.is_empty() {
            return Err(Error::InvalidParameters {
                module_id: module_id.to_owned(),
                problems,
            });
        }
        let Value::Object(parameters) = as_value else {
            unreachable!("built as an object above")
        };
        let summary = &module.summary;
        let mut run = Run::new(module_id, &summary.info.name).with_priority(options.priority);
        if let Some(at) = options.not_before {
            run = run.with_not_before(at);
        }
        run.parameters = parameters;
        run.module_version = Some(summary.content_hash.clone());
        if let Some(versions) = self.queue.get() {
            return self.enqueue(versions, &module, run, key).await;
        }
        self.launch(&module, run, key).await
    }

    /// Records a run in the shared queue. With room here for it now, it is
    /// claimed by this node in the same write (`Running`) and starts at
    /// once; otherwise it waits, `Queued`, for any node to claim it.
    async fn enqueue(
        &self,
        versions: &Arc<Versions>,
        module: &Arc<LoadedModule>,
        mut run: Run,
        key: Option<&str>,
    ) -> Result<String> {
        if self.manager.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        versions.retain(module);
        let run_id = run.run_id.clone();
        let attempts = module.summary.manifest.limits.max_attempts;
        // Runs queued earlier go first: with any waiting, this one queues
        // behind them even if there is room for it now.
        let due = run.not_before.is_none();
        let room = if due && versions.drained(module.summary.info.id.as_str()) {
            self.room_for(module)
        } else {
            None
        };
        let Some((room, permits)) = room else {
            self.registry().enqueue(&run, attempts, key).await?;
            // A run not due yet is for a claim when it is due, and holds
            // up no start before then.
            match run.not_before {
                None => versions.queued_here(&run.module_id),
                Some(at) => versions.due_here(at),
            }
            return Ok(run_id);
        };
        run.status = RunStatus::Running;
        run.started_at = Some(chrono::Utc::now());
        run.attempt = Some(1);
        // A task records and starts the run, so that a caller that stops
        // waiting cannot leave it recorded `Running` with nothing running it.
        let (runner, module) = (self.clone(), module.clone());
        let key = key.map(str::to_owned);
        let recorded = tokio::spawn(async move {
            runner
                .registry()
                .enqueue(&run, attempts, key.as_deref())
                .await?;
            if let Err(e) = runner.start_claimed(&module, &run, room, permits) {
                // Shutting down meanwhile: the run is any node's again.
                tracing::warn!(run_id = %run.run_id, error = %e, "giving a run back to the queue");
                runner
                    .registry()
                    .release(
                        std::slice::from_ref(&run.run_id),
                        "given back: the node that started it was shutting down",
                    )
                    .await?;
            }
            Ok::<_, Error>(())
        });
        recorded.await.map_err(|_| Error::RegistryClosed)??;
        Ok(run_id)
    }

    /// A slot, an instance and the module's own permit, if all are free now.
    fn room_for(&self, module: &LoadedModule) -> Option<(Room, Permits)> {
        let room = self.manager.reserve(1).pop()?;
        let first = match module.summary.manifest.limits.max_concurrent {
            None => None,
            Some(max) => {
                let gate = self.gate(&module.summary.info.id, Some(max));
                Some(gate.first.as_ref()?.try_acquire()?)
            }
        };
        let instance = self.host.instance_pool().try_acquire_owned().ok()?;
        Some((room, (first, Some(instance))))
    }

    /// From now on, records module runs in the registry's shared queue
    /// (PostgreSQL: several nodes on one database) and executes the queued
    /// runs this node has room for, whichever node started them: see
    /// [`Claimer`]. Fails if the registry is not a shared queue, or if
    /// this runner claims already.
    pub fn claim_from_queue(&self) -> Result<Claimer> {
        if !self.registry().is_shared_queue() {
            return Err(Error::InvalidConfig(
                "this registry is not a queue several nodes share (PostgreSQL); runs start \
                 where they are started"
                    .into(),
            ));
        }
        let versions = Arc::new(Versions::default());
        if self.queue.set(versions.clone()).is_err() {
            return Err(Error::InvalidConfig(
                "this runner claims from its queue already".into(),
            ));
        }
        Ok(Claimer::start(self.clone(), versions))
    }

    /// Starts a run this node claimed from the shared queue, on the module
    /// version it was started on, in the room and with the permits taken
    /// for it.
    pub(crate) fn start_claimed(
        &self,
        module: &Arc<LoadedModule>,
        run: &Run,
        room: Room,
        permits: Permits,
    ) -> Result<()> {
        let work = self.work(module, run);
        self.manager.start_claimed(run, room, permits, work)
    }

    /// The work of `run`: one execution of `module` in a fresh sandbox.
    fn work(
        &self,
        module: &Arc<LoadedModule>,
        run: &Run,
    ) -> impl Future<Output = ModuleOutcome> + Send + use<> {
        execute(
            self.host.clone(),
            module.clone(),
            self.registry().clone(),
            run.run_id.clone(),
            serde_json::to_string(&run.parameters).expect("a JSON map always serializes"),
        )
    }

    /// Starts `run`, a run of `module` as recorded, through the manager.
    async fn launch(
        &self,
        module: &Arc<LoadedModule>,
        run: Run,
        key: Option<&str>,
    ) -> Result<String> {
        let gate = self.gate(
            &run.module_id,
            module.summary.manifest.limits.max_concurrent,
        );
        let work = self.work(module, &run);
        self.manager
            .start_gated_task(run, key.map(Box::from), Some(gate), work)
            .await
    }

    /// Starts again the module runs a previous process left `Queued` in
    /// the registry (it stopped, or crashed, before their turn came): each
    /// with its id, parameters and history, on the module version it was
    /// started with. A run whose module is no longer loaded, or has changed
    /// since, is recorded `Failed` saying so. Returns how many were resumed.
    ///
    /// For a registry this process holds alone (SQLite): on a shared
    /// database, the queued runs of other nodes are theirs.
    pub async fn resume_queued(&self) -> Result<usize> {
        let mut resumed = 0;
        let mut queued = self.registry().runs_by_status(RunStatus::Queued).await?;
        // Resumed in the order a claim takes them: by priority, then as
        // they became due, then as they were started.
        queued.sort_by_key(|run| (run.queue_order(), run.created_at));
        for run in queued {
            if self.manager.is_task_active(&run.run_id) {
                continue;
            }
            let run_id = run.run_id.clone();
            let module = self.host.get(&run.module_id);
            let refusal = match (&module, &run.module_version) {
                (None, _) => Some(format!(
                    "module {} is not loaded any more; the run was queued before modrun \
                     stopped and cannot be resumed",
                    run.module_id
                )),
                (Some(module), Some(version)) if module.summary.content_hash != *version => {
                    Some(format!(
                        "module {} changed while the run was queued (it was {version}, it is \
                         now {}); start it again to run the new version",
                        run.module_id, module.summary.content_hash
                    ))
                }
                (Some(_), None) => {
                    Some("the run was queued as a plain task, which cannot be resumed".to_owned())
                }
                (Some(_), Some(_)) => None,
            };
            match (refusal, module) {
                (Some(reason), _) => {
                    self.registry()
                        .transition(&Transition::failed(&run_id, EXIT_FAILURE, reason))
                        .await?;
                }
                (None, Some(module)) => match self.launch(&module, run, None).await {
                    Ok(_) => resumed += 1,
                    Err(e) => tracing::warn!(run_id, error = %e, "cannot resume a queued run"),
                },
                (None, None) => unreachable!("a refusal is given when the module is missing"),
            }
        }
        Ok(resumed)
    }

    /// Cancels a run ([`BackgroundTaskManager::cancel_task`]), and nudges
    /// every running module to yield at once, so that a cancelled module in
    /// a tight loop stops now rather than at the next epoch tick.
    ///
    /// On a registry several nodes share, a run still queued for no node
    /// is cancelled too, and the node executing a run is asked to cancel
    /// it; see [`cancel_or_ask`](Self::cancel_or_ask). `true` only for a
    /// run cancelled by the time this returns.
    pub async fn cancel(&self, run_id: &str) -> Result<bool> {
        Ok(matches!(
            self.cancel_or_ask(run_id).await?,
            CancelAnswer::Cancelled
        ))
    }

    /// Cancels a run this node executes (or has queued, in its own
    /// memory): what a node does when another asks it to. `false` for any
    /// other run.
    pub async fn cancel_here(&self, run_id: &str) -> Result<bool> {
        let cancelled = self.manager.cancel_task(run_id).await?;
        if cancelled {
            self.host.engine().increment_epoch();
        }
        Ok(cancelled)
    }

    /// Cancels a run this node executes, or one queued for no node yet;
    /// for a run another node executes, asks that node to
    /// ([`RunStore::request_cancel`](crate::RunStore::request_cancel)).
    pub async fn cancel_or_ask(&self, run_id: &str) -> Result<CancelAnswer> {
        if self.cancel_here(run_id).await? {
            return Ok(CancelAnswer::Cancelled);
        }
        Ok(match self.registry().request_cancel(run_id).await? {
            // An empty node name: the store cancelled it, unclaimed.
            Some(node) if node.is_empty() => CancelAnswer::Cancelled,
            Some(node) => CancelAnswer::Asked(node),
            None => CancelAnswer::NotActive,
        })
    }

    /// The cleanup that keeps the registry within `retain` (`None`: keep
    /// runs for ever) and within each loaded module's own retention
    /// (its manifest's `[retention]`); `None` when nothing is ever removed.
    #[must_use]
    pub fn retention(&self, retain: Option<std::time::Duration>) -> Option<Cleanup> {
        let mut overrides = Vec::new();
        for module in self.host.modules() {
            let retention = &module.manifest.retention;
            let limits = [
                (None, retention.keep),
                (Some(RunStatus::Failed), retention.keep_failed),
            ];
            for (status, keep) in limits {
                if let Some(keep) = keep {
                    overrides.push(Override {
                        module_id: module.info.id.clone(),
                        status,
                        before: ago(keep),
                    });
                }
            }
        }
        if retain.is_none() && overrides.is_empty() {
            return None;
        }
        Some(Cleanup {
            before: retain.map_or(chrono::DateTime::<chrono::Utc>::MIN_UTC, ago),
            statuses: Vec::new(),
            module_id: None,
            overrides,
        })
    }

    /// What a run of `module_id` waits on: the module's own limit, if it
    /// has one, then the engine's pool of instances, so that runs past the
    /// pool wait `Queued` instead of failing to instantiate.
    pub(crate) fn gate(&self, module_id: &str, max_concurrent: Option<usize>) -> Arc<Gate> {
        let mut gates = self.gates.lock_unpoisoned();
        let Some(max) = max_concurrent else {
            return gates.pool.clone();
        };
        let pool = self.host.instance_pool();
        let limited = || {
            Arc::new(Gate {
                first: Some(Arc::new(Line::new(max))),
                then: Some(pool.clone()),
            })
        };
        let entry = gates
            .modules
            .entry(module_id.to_owned())
            .or_insert_with(|| (max, limited()));
        if entry.0 != max {
            // The manifest changed: new runs use the new limit.
            *entry = (max, limited());
        }
        entry.1.clone()
    }
}

/// What [`ModuleRunner::cancel_or_ask`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelAnswer {
    /// The run is cancelled.
    Cancelled,
    /// Another node executes the run, and was asked to cancel it: it is
    /// cancelled once that node has stopped it (or, if that node is lost,
    /// once another settles its runs).
    Asked(String),
    /// No run by this id was active here or, as far as the registry
    /// knows, anywhere that can be asked.
    NotActive,
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// How a module run ended, and its log, for the manager to record together.
struct ModuleOutcome(Result<Value, Failure>, Vec<LogEntry>);

impl TaskOutput for ModuleOutcome {
    fn into_outcome(self) -> Result<Value, Failure> {
        self.0
    }

    fn into_report(self) -> (Result<Value, Failure>, Option<Vec<LogEntry>>) {
        (self.0, Some(self.1))
    }
}

/// Hands over the run's log when the run ends, to be saved with its
/// terminal status; queues it for saving itself when the run's future is
/// dropped midway (cancelled), where nothing else would. The write is queued
/// in order with the run's others, so the manager's shutdown flushes it.
struct LogSaver {
    registry: RunRegistry,
    run_id: String,
    log: Arc<Mutex<RunLog>>,
    stdout: CappedOutput,
    stderr: CappedOutput,
    saved: bool,
}

impl LogSaver {
    fn entries(&self) -> Vec<LogEntry> {
        self.log
            .lock_unpoisoned()
            .finish(&self.stdout, &self.stderr)
    }

    fn finish(mut self) -> Vec<LogEntry> {
        self.saved = true;
        self.entries()
    }
}

impl Drop for LogSaver {
    fn drop(&mut self) {
        if self.saved {
            return;
        }
        if let Err(e) = self.registry.record_log(&self.run_id, self.entries()) {
            tracing::warn!(error = %e, "cannot save the stopped run's log");
        }
    }
}

/// Runs a module once in a fresh Store: a Store is dynamic state that a
/// trap can leave inconsistent, so none is ever reused.
async fn execute(
    host: ModuleHost,
    module: Arc<LoadedModule>,
    registry: RunRegistry,
    run_id: String,
    parameters: String,
) -> ModuleOutcome {
    let config = host.config();
    let limits = &module.summary.manifest.limits;
    let stdout = CappedOutput::new(config.output_cap);
    let stderr = CappedOutput::new(config.output_cap);
    let log = Arc::new(Mutex::new(RunLog::new(config.log_cap)));
    let saver = LogSaver {
        registry: registry.clone(),
        run_id: run_id.clone(),
        log: log.clone(),
        stdout: stdout.clone(),
        stderr: stderr.clone(),
        saved: false,
    };
    let wasi = match sandbox(&module.summary.manifest.grants, &stdout, &stderr) {
        Ok(wasi) => wasi,
        Err(failure) => return ModuleOutcome(Err(failure), saver.finish()),
    };
    let context = RunContext {
        run_id,
        module_id: module.summary.info.id.clone(),
        registry,
        log,
        span: tracing::Span::current(),
        echo: EchoBudget::new(),
    };
    let mut state = HostState::new(wasi, limits.memory_bytes, Some(context));
    state.symlinks_allowed = module.summary.manifest.grants.symlinks;
    let mut store = host.store(state);

    let finished = {
        let call = async {
            let instance = module.pre.instantiate_async(&mut store).await?;
            instance
                .modrun_plugin_plugin()
                .call_run(&mut store, &parameters)
                .await
        };
        tokio::time::timeout(limits.timeout, call).await
    };
    let outcome = match finished {
        Err(_) => Err(Failure {
            message: format!("timed out after {}", seconds(limits.timeout)),
            exit_code: EXIT_TIMEOUT,
        }),
        Ok(Ok(Ok(text))) if text.len() > limits.max_output_bytes => Err(Failure::new(format!(
            "the module returned {} bytes of output, over its limit of {}; \
             raise limits.max_output_kib in its manifest, or have it return less",
            text.len(),
            size_in_words(limits.max_output_bytes)
        ))),
        Ok(Ok(Ok(text))) => serde_json::from_str(&text)
            .map_err(|e| Failure::new(format!("the module returned output that is not JSON: {e}"))),
        Ok(Ok(Err(message))) => Err(Failure::new(message)),
        Ok(Err(error)) => {
            let mut notes = saver.log.lock_unpoisoned();
            match error.downcast_ref::<I32Exit>() {
                Some(&I32Exit(status)) => exit_outcome(status, &mut notes),
                None => {
                    // The one-line message says what happened; the details
                    // (a wasm backtrace) go to the run's log, below the
                    // guest language's own account when it gave one.
                    let (failure, level) = trap_failure(&error, store.data(), &stderr.text());
                    notes.note(level, format!("{error:?}"));
                    Err(failure)
                }
            }
        }
    };
    if let Some(run) = &store.data().run
        && run.echo.suppressed > 0
    {
        tracing::warn!(
            lines = run.echo.suppressed,
            "log lines of this run not echoed here (too many too fast); the run's own log keeps them, up to its cap"
        );
    }
    ModuleOutcome(outcome, saver.finish())
}

/// The module's WASI: nothing but clocks, random numbers and captured
/// output, plus what its manifest grants.
fn sandbox(
    grants: &Grants,
    stdout: &CappedOutput,
    stderr: &CappedOutput,
) -> std::result::Result<WasiCtx, Failure> {
    let mut wasi = WasiCtx::builder();
    wasi.stdout(stdout.clone()).stderr(stderr.clone());
    for name in &grants.env {
        if let Ok(value) = std::env::var(name) {
            wasi.env(name, value);
        }
    }
    for dir in &grants.dirs {
        let perms = if dir.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        wasi.preopened_dir(&dir.host, &dir.guest, perms)
            .map_err(|e| {
                Failure::new(format!(
                    "cannot open the granted directory {}: {e:#}",
                    dir.host.display()
                ))
            })?;
    }
    Ok(wasi.build())
}

/// How a run ends whose module called `exit` before `run` returned.
fn exit_outcome(status: i32, notes: &mut RunLog) -> Result<Value, Failure> {
    if status == 0 {
        notes.note(
            LogLevel::Info,
            "the module called exit with status 0 before `run` returned: recorded as completed, \
             with no output (return a result from `run` to give one)"
                .into(),
        );
        Ok(Value::Null)
    } else {
        Err(Failure::new(
            "the module exited with a failure status before `run` returned (WASI carries only \
             success or failure, not the number it exited with)",
        ))
    }
}

/// A readable reason for a run that trapped, and how much the trap's own
/// details matter beside it: little where the guest's language said what
/// went wrong (its account is in the run's log, from standard error).
fn trap_failure(error: &wasmtime::Error, state: &HostState, stderr: &str) -> (Failure, LogLevel) {
    if state.limiter.exceeded {
        let failure = Failure::new(format!(
            "the module exceeded its memory limit of {} and was stopped",
            size_in_words(state.limiter.limit())
        ));
        return (failure, LogLevel::Error);
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => (
            Failure::new("the module overflowed its stack (recursion too deep) and was stopped"),
            LogLevel::Error,
        ),
        Some(Trap::UnreachableCodeReached) => match guest_failure(stderr) {
            Some(failure) => (failure, LogLevel::Debug),
            None => (
                Failure::new("the module trapped: wasm `unreachable` instruction executed"),
                LogLevel::Error,
            ),
        },
        Some(trap) => (
            Failure::new(format!("the module trapped: {trap}")),
            LogLevel::Error,
        ),
        None => (
            Failure::new(format!("the module failed: {}", error.root_cause())),
            LogLevel::Error,
        ),
    }
}

/// The failure a guest language reported on standard error before it
/// aborted: an uncaught Python exception (its type and message; the
/// traceback stays in the run's log), or a Rust panic (its message and
/// place, exit code 101). A JavaScript `Error` needs no reading here: the
/// build wraps the module so that it comes back as the run's error.
fn guest_failure(stderr: &str) -> Option<Failure> {
    if let Some(exception) = python_exception(stderr) {
        return Some(Failure::new(exception));
    }
    stderr.contains("panicked at").then(|| Failure {
        message: format!("the module panicked: {}", panic_message(stderr)),
        exit_code: EXIT_PANIC,
    })
}

/// The exception line of the last Python traceback in `stderr`:
/// `ValueError: bad value`.
fn python_exception(stderr: &str) -> Option<String> {
    let (_, traceback) = stderr.rsplit_once("Traceback (most recent call last):\n")?;
    let exception: Vec<&str> = traceback
        .lines()
        .skip_while(|line| line.starts_with(' ') || line.starts_with('\t'))
        .take_while(|line| !line.is_empty() && !line.starts_with("thread '"))
        .collect();
    let exception = exception.join("\n");
    (!exception.trim().is_empty()).then(|| cut_to(exception.trim().to_owned(), 2000))
}

/// The message of a Rust panic as the guest's standard library printed it:
/// the lines after "panicked at <place>:" up to the backtrace note.
fn panic_message(stderr: &str) -> String {
    let after = stderr
        .rsplit_once("panicked at ")
        .map_or(stderr, |(_, rest)| rest);
    let mut lines = after.lines();
    let place = lines.next().unwrap_or_default().trim_end_matches(':');
    let message: Vec<&str> = lines
        .take_while(|line| !line.starts_with("note: "))
        .collect();
    format!("{} (at {place})", message.join("\n").trim())
}

/// The most bytes of one problem a start's parameters have, as reported.
const MAX_PROBLEM: usize = 1000;

/// `text` cut to about `max` bytes by leaving out its middle, marked
/// " [cut] ": a message keeps its start (which field) and its end (what
/// is wrong), however long the value it quotes.
fn cut_middle(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let head = text.floor_char_boundary(max / 2);
    let tail = text.ceil_char_boundary(text.len() - max / 2);
    format!("{} [cut] {}", &text[..head], &text[tail..])
}

/// Whether `parameters`, as JSON text, are longer than `max` bytes; the
/// count stops there.
fn longer_than(parameters: &Map<String, Value>, max: usize) -> bool {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 = (self.0.checked_sub(bytes.len()))
                .ok_or_else(|| std::io::Error::other("over the limit"))?;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(Count(max), parameters).is_err()
}

fn size_in_words(bytes: usize) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

fn seconds(duration: std::time::Duration) -> String {
    format!("{}s", duration.as_secs_f64())
}
