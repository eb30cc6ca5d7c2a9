//! [`Modrun`]: the one entry point for the common case. A builder chooses
//! the plugins directory, the store, the limits, the compiled-module cache
//! and the application's own host functions; what it builds is wired the
//! way `modrun serve` wires it (it is what `serve` uses): a registry, a
//! task manager, a module host with the plugins loaded, and a runner over
//! them, plus whatever the store asks for — the runs a SQLite file left
//! queued resumed, and on a shared PostgreSQL database this node's share
//! of the queue claimed and other nodes' cancels honoured.
//!
//! The layers stay public ([`runner`](Modrun::runner),
//! [`registry`](Modrun::registry), …) for what the entry point does not
//! cover.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Claimer;
use crate::error::{Error, Result};
use crate::handle::RunHandle;
use crate::manager::{BackgroundTaskManager, ShutdownReport, TaskLimits};
use crate::module::{
    DEFAULT_DEBOUNCE, HostConfig, HostFunctions, LoadReport, ModuleHost, ModuleRunner, Reloader,
};
use crate::registry::RunRegistry;
use crate::run::{Run, StartOptions};
use crate::sync::LockUnpoisoned;

/// How often finished runs past their retention are removed.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// modrun, embedded: loads plugins and runs them as tracked background
/// tasks. Built with [`Modrun::builder`].
///
/// # Examples
///
/// ```no_run
/// use modrun::Modrun;
/// use serde_json::json;
///
/// # #[tokio::main]
/// # async fn main() -> anyhow::Result<()> {
/// let modrun = Modrun::builder()
///     .plugins("plugins")
///     .sqlite(".modrun/registry.db")
///     .max_concurrent(8)
///     .build()
///     .await?;
/// let run = modrun.start("hello", json!({"name": "Ada"})).await?;
/// let finished = run.wait().await?;
/// println!("{}: {:?}", finished.status, finished.output);
/// modrun.shutdown(std::time::Duration::from_secs(30)).await?;
/// # Ok(())
/// # }
/// ```
pub struct Modrun {
    runner: ModuleRunner,
    loaded: LoadReport,
    _reloader: Option<Reloader>,
    claimer: Mutex<Option<Claimer>>,
    /// The tasks this entry point keeps going (cancels other nodes asked
    /// for, retention): stopped with it.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Modrun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Modrun")
            .field("modules", &self.runner.host().module_ids())
            .finish_non_exhaustive()
    }
}

/// Where runs are recorded.
#[derive(Debug)]
enum Store {
    Memory,
    #[cfg(feature = "sqlite")]
    Sqlite(PathBuf),
    #[cfg(feature = "postgres")]
    Postgres(String),
    Registry(RunRegistry),
}

/// Chooses what a [`Modrun`] is made of; [`build`](Self::build) makes it.
///
/// The defaults: no plugins directory (load modules through
/// [`host`](Modrun::host)), runs in memory, no bound on concurrent runs,
/// no hot reload, and the compiled-module cache beside a SQLite file (none
/// for a memory store).
#[derive(Debug)]
#[must_use = "a builder does nothing until it is built"]
pub struct ModrunBuilder {
    plugins: Option<PathBuf>,
    store: Store,
    limits: TaskLimits,
    host: HostConfig,
    cache_dir: Option<Option<PathBuf>>,
    functions: HostFunctions,
    hot_reload: bool,
    retain: Option<Duration>,
    #[cfg(feature = "postgres")]
    node: Option<String>,
    #[cfg(feature = "postgres")]
    lease: Option<Duration>,
}

impl Modrun {
    /// A builder with the defaults.
    pub fn builder() -> ModrunBuilder {
        ModrunBuilder {
            plugins: None,
            store: Store::Memory,
            limits: TaskLimits::default(),
            host: HostConfig::default(),
            cache_dir: None,
            functions: HostFunctions::new(),
            hot_reload: false,
            retain: None,
            #[cfg(feature = "postgres")]
            node: None,
            #[cfg(feature = "postgres")]
            lease: None,
        }
    }

    /// Starts a run of `module_id` with `parameters` (a JSON object, or
    /// null for none): see [`ModuleRunner::start`]. The handle it returns
    /// waits for the run's end, cancels it and follows its events.
    pub async fn start(&self, module_id: &str, parameters: Value) -> Result<RunHandle> {
        self.runner.start(module_id, parameters).await
    }

    /// [`start`](Self::start) with a priority, a not-before time or an
    /// idempotency key: see [`ModuleRunner::start_with`].
    pub async fn start_with(
        &self,
        module_id: &str,
        parameters: Value,
        options: &StartOptions,
    ) -> Result<RunHandle> {
        self.runner.start_with(module_id, parameters, options).await
    }

    /// [`start`](Self::start), safe to retry with the same `key`: see
    /// [`ModuleRunner::start_idempotent`].
    pub async fn start_idempotent(
        &self,
        module_id: &str,
        parameters: Value,
        key: &str,
    ) -> Result<RunHandle> {
        self.runner
            .start_idempotent(module_id, parameters, key)
            .await
    }

    /// Starts a run and waits for its end: the finished run, whatever its
    /// status (a failed run is an `Ok` with status `Failed`; an `Err` means
    /// it could not be started or followed).
    pub async fn run(&self, module_id: &str, parameters: Value) -> Result<Run> {
        self.start(module_id, parameters).await?.wait().await
    }

    /// A handle on a run started before: see [`ModuleRunner::handle`].
    #[must_use]
    pub fn handle(&self, run_id: impl Into<String>) -> RunHandle {
        self.runner.handle(run_id)
    }

    /// Cancels a run, wherever it executes: see [`ModuleRunner::cancel`].
    pub async fn cancel(&self, run_id: &str) -> Result<bool> {
        self.runner.cancel(run_id).await
    }

    /// What loading the plugins directory did when this was built: the
    /// modules loaded, and each file that failed with its reason.
    #[must_use]
    pub fn loaded(&self) -> &LoadReport {
        &self.loaded
    }

    /// The module runner.
    #[must_use]
    pub fn runner(&self) -> &ModuleRunner {
        &self.runner
    }

    /// The module host: the loaded modules, and loads of more.
    #[must_use]
    pub fn host(&self) -> &ModuleHost {
        self.runner.host()
    }

    /// The task manager, which also takes plain Rust futures as tracked
    /// tasks ([`BackgroundTaskManager::start_task`]).
    #[must_use]
    pub fn manager(&self) -> &BackgroundTaskManager {
        self.runner.manager()
    }

    /// The run registry: runs, their history, and a stream of events.
    #[must_use]
    pub fn registry(&self) -> &RunRegistry {
        self.runner.registry()
    }

    /// Stops taking runs: stops claiming from a shared queue (its queued
    /// runs stay there for the other nodes), then shuts the task manager
    /// down, giving running runs `grace` to finish before they are
    /// cancelled ([`BackgroundTaskManager::shutdown`]). Once this returns
    /// and the `Modrun` is dropped, nothing holds its store: a SQLite file
    /// may be opened again.
    pub async fn shutdown(&self, grace: Duration) -> Result<ShutdownReport> {
        let claimer = self.claimer.lock_unpoisoned().take();
        if let Some(claimer) = claimer {
            claimer.stop().await;
        }
        let tasks = std::mem::take(&mut *self.tasks.lock_unpoisoned());
        for task in tasks {
            task.abort();
            // Gone, with the registry it holds, once this returns.
            let _ = task.await;
        }
        self.runner.manager().shutdown(grace).await
    }
}

impl Drop for Modrun {
    fn drop(&mut self) {
        for task in self.tasks.lock_unpoisoned().iter() {
            task.abort();
        }
    }
}

impl ModrunBuilder {
    /// Loads the components (`*.wasm`) of `dir`, and, with
    /// [`hot_reload`](Self::hot_reload), keeps them in step with it.
    pub fn plugins(mut self, dir: impl Into<PathBuf>) -> ModrunBuilder {
        self.plugins = Some(dir.into());
        self
    }

    /// Keeps runs in this process's memory only (the default).
    pub fn in_memory(mut self) -> ModrunBuilder {
        self.store = Store::Memory;
        self
    }

    /// Records runs in the SQLite file at `path` (created if missing),
    /// which survives restarts and crashes. The runs a previous process
    /// left queued are started again; those it left running are marked
    /// `Failed` ("interrupted").
    #[cfg(feature = "sqlite")]
    pub fn sqlite(mut self, path: impl Into<PathBuf>) -> ModrunBuilder {
        self.store = Store::Sqlite(path.into());
        self
    }

    /// Records runs in a PostgreSQL database (`postgres://user@host/db`)
    /// that several nodes may share: runs started on any node run on
    /// whichever has room, and a cancel reaches the node running the run.
    #[cfg(feature = "postgres")]
    pub fn postgres(mut self, url: impl Into<String>) -> ModrunBuilder {
        self.store = Store::Postgres(url.into());
        self
    }

    /// Records runs at `location`: a PostgreSQL URL (`postgres://…` or
    /// `postgresql://…`), or else the path of a SQLite file.
    #[cfg(all(feature = "sqlite", feature = "postgres"))]
    pub fn store(self, location: &str) -> ModrunBuilder {
        if crate::registry::is_database_url(location) {
            self.postgres(location)
        } else {
            self.sqlite(location)
        }
    }

    /// Records runs in `registry`, over a store of your own choosing or
    /// options ([`RunRegistry::new`]).
    pub fn registry(mut self, registry: RunRegistry) -> ModrunBuilder {
        self.store = Store::Registry(registry);
        self
    }

    /// Bounds the runs executing at once and those waiting for a slot.
    pub fn limits(mut self, limits: TaskLimits) -> ModrunBuilder {
        self.limits = limits;
        self
    }

    /// Bounds the runs executing at once; more wait, queued.
    pub fn max_concurrent(mut self, max: usize) -> ModrunBuilder {
        self.limits.max_concurrent = Some(max);
        self
    }

    /// The module host's configuration: default limits of modules, the
    /// memory ceiling, the instance pool, output and log caps.
    pub fn host_config(mut self, config: HostConfig) -> ModrunBuilder {
        self.host = config;
        self
    }

    /// Keeps compiled components in `dir`, by content hash, so that a
    /// restart does not compile them again. It must be a directory of its
    /// own, never the plugins directory: what it holds is loaded as
    /// machine code.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> ModrunBuilder {
        self.cache_dir = Some(Some(dir.into()));
        self
    }

    /// Compiles components at every start; keeps no cache.
    pub fn no_cache(mut self) -> ModrunBuilder {
        self.cache_dir = Some(None);
        self
    }

    /// The application's own host functions, which plugins may import.
    pub fn host_functions(mut self, functions: HostFunctions) -> ModrunBuilder {
        self.functions = functions;
        self
    }

    /// Watches the plugins directory and reloads a module when its
    /// component or manifest changes; runs already going finish on the
    /// version they started with.
    pub fn hot_reload(mut self, on: bool) -> ModrunBuilder {
        self.hot_reload = on;
        self
    }

    /// Removes finished runs older than `age` now and every minute, so
    /// that a process that runs for months keeps its registry bounded.
    /// Modules whose manifest sets a retention of their own keep their
    /// runs that long, with or without this.
    pub fn retain(mut self, age: Duration) -> ModrunBuilder {
        self.retain = Some(age);
        self
    }

    /// This node's name among the nodes sharing a PostgreSQL database
    /// (default: host name and process id).
    #[cfg(feature = "postgres")]
    pub fn node(mut self, name: impl Into<String>) -> ModrunBuilder {
        self.node = Some(name.into());
        self
    }

    /// How long this node's lease on a PostgreSQL database lasts: past it
    /// without a renewal, other nodes settle its runs.
    #[cfg(feature = "postgres")]
    pub fn lease(mut self, lease: Duration) -> ModrunBuilder {
        self.lease = Some(lease);
        self
    }

    /// Opens the store, loads the plugins, and starts what the store needs.
    ///
    /// Fails if the store cannot be opened, the plugins directory cannot
    /// be read, the host functions cannot be linked, or `max_concurrent`
    /// is more than the engine's instance pool holds. A component that
    /// fails to load does not fail the build: see [`Modrun::loaded`].
    pub async fn build(self) -> Result<Modrun> {
        if let Some(max) = self.limits.max_concurrent
            && max > self.host.max_instances as usize
        {
            return Err(Error::InvalidConfig(format!(
                "max_concurrent {max} is more than the {} runs the WebAssembly engine's \
                 instance pool holds; choose at most that, or raise HostConfig::max_instances",
                self.host.max_instances
            )));
        }
        let default_cache = match &self.store {
            #[cfg(feature = "sqlite")]
            Store::Sqlite(path) => Some(crate::module::shared_cache_dir(path)),
            #[cfg(feature = "postgres")]
            Store::Postgres(url) => {
                Some(crate::module::shared_cache_dir(std::path::Path::new(url)))
            }
            Store::Memory | Store::Registry(_) => None,
        };
        #[cfg(feature = "sqlite")]
        let resumes_queue = matches!(self.store, Store::Sqlite(_));
        #[cfg(not(feature = "sqlite"))]
        let resumes_queue = false;
        let registry = match self.store {
            Store::Memory => RunRegistry::in_memory(),
            #[cfg(feature = "sqlite")]
            Store::Sqlite(path) => RunRegistry::open_sqlite(path)?,
            #[cfg(feature = "postgres")]
            Store::Postgres(url) => {
                let defaults = crate::registry::PostgresOptions::default();
                let options = crate::registry::PostgresOptions {
                    node: self.node.unwrap_or(defaults.node),
                    lease: self.lease.unwrap_or(defaults.lease),
                    ..defaults
                };
                RunRegistry::new(crate::registry::PostgresStore::connect(&url, options).await?)
            }
            Store::Registry(registry) => registry,
        };
        let config = HostConfig {
            cache_dir: self.cache_dir.unwrap_or(default_cache),
            ..self.host
        };
        let host = ModuleHost::with_host_functions(config, &self.functions)?;
        let loaded = match &self.plugins {
            Some(dir) => host.load_dir(dir).await?,
            None => LoadReport::default(),
        };
        let reloader = match (&self.plugins, self.hot_reload) {
            (Some(dir), true) => Some(host.watch(dir, DEFAULT_DEBOUNCE)?),
            _ => None,
        };
        let manager = BackgroundTaskManager::with_limits(registry.clone(), self.limits);
        let runner = ModuleRunner::new(host, manager);
        if resumes_queue {
            // A registry file this process holds alone: the runs the last
            // process left queued are ours to start.
            let resumed = runner.resume_queued().await?;
            if resumed > 0 {
                tracing::info!(
                    runs = resumed,
                    "resumed the runs the last process left queued"
                );
            }
        }
        // On a database several nodes share, the store is the queue: runs
        // started here may run anywhere, and this node runs its share.
        let claimer = if registry.is_shared_queue() {
            Some(runner.claim_from_queue()?)
        } else {
            None
        };
        let mut tasks = Vec::new();
        if let Some(requests) = registry.take_cancel_requests() {
            tasks.push(tokio::spawn(honour_cancels(runner.clone(), requests)));
        }
        tasks.push(tokio::spawn(keep_bounded(runner.clone(), self.retain)));
        Ok(Modrun {
            runner,
            loaded,
            _reloader: reloader,
            claimer: Mutex::new(claimer),
            tasks: Mutex::new(tasks),
        })
    }
}

/// Cancels the runs of this node that other nodes sharing the registry
/// asked to cancel.
async fn honour_cancels(runner: ModuleRunner, mut requests: tokio::sync::mpsc::Receiver<String>) {
    while let Some(run_id) = requests.recv().await {
        match runner.cancel_here(&run_id).await {
            Ok(true) => tracing::info!(run_id, "run cancelled as another node asked"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(run_id, error = %e, "cannot cancel a run as another node asked");
            }
        }
    }
}

/// Keeps the registry bounded: at once, then every [`RETENTION_EVERY`],
/// removes the finished runs past `retain` or their module's own
/// retention, in small batches that starts and status changes pass.
async fn keep_bounded(runner: ModuleRunner, retain: Option<Duration>) {
    loop {
        if let Some(cleanup) = runner.retention(retain) {
            match runner.registry().cleanup(&cleanup).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::info!(removed, "removed finished runs past their retention");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot remove old runs now; trying again later");
                }
            }
        }
        tokio::time::sleep(RETENTION_EVERY).await;
    }
}
