//! `modrun serve`: the HTTP API over the plugins directory, with the run
//! registry in SQLite, hot reload, and a graceful shutdown. `modrun dev`
//! serves the same way ([`Stack`], [`Listening`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use modrun::cluster::Claimer;
use modrun::http::{AppState, BrowserPolicy, router};
use modrun::module::{DEFAULT_DEBOUNCE, Reloader};
use modrun::registry::{PostgresOptions, PostgresStore, is_database_url};
use modrun::{
    BackgroundTaskManager, HostConfig, ModuleHost, ModuleRunner, RunRegistry, ShutdownReport,
    TaskLimits,
};

/// How `serve` was asked to run.
pub struct ServeOptions {
    pub bind: SocketAddr,
    pub plugins: PathBuf,
    pub db: PathBuf,
    pub in_memory: bool,
    pub token: Option<String>,
    pub grace: Duration,
    pub limits: TaskLimits,
    pub browser: BrowserPolicy,
    pub node: NodeOptions,
    /// How long finished runs are kept (`None`: for ever).
    pub retain: Option<Duration>,
}

/// How often `serve` removes the finished runs past their retention.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Keeps the registry bounded: at once, then every [`RETENTION_EVERY`],
/// removes the finished runs past `retain` or their module's own
/// retention, in small batches that starts and status changes pass.
fn keep_bounded(runner: ModuleRunner, retain: Option<Duration>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
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
    })
}

/// Who this server is among the nodes sharing a PostgreSQL registry.
pub struct NodeOptions {
    /// Its name (default: host name and process id).
    pub name: Option<String>,
    /// How long its lease lasts.
    pub lease: Duration,
}

impl Default for NodeOptions {
    fn default() -> NodeOptions {
        NodeOptions {
            name: None,
            lease: modrun::registry::DEFAULT_LEASE,
        }
    }
}

/// What a server is made of: the registry, a host (watching the plugins
/// directory, unless its owner watches it), and a runner over them.
pub struct Stack {
    pub runner: ModuleRunner,
    _reloader: Option<Reloader>,
    /// On a shared database: takes this node's share of the queue.
    claimer: Option<Claimer>,
}

impl Stack {
    /// Opens the registry (`db`, or memory), loads `plugins` into a host
    /// that caches compiled modules beside the registry, and, with `watch`,
    /// keeps the host in step with the directory.
    pub async fn open(
        plugins: &Path,
        db: &Path,
        in_memory: bool,
        limits: TaskLimits,
        watch: bool,
        node: &NodeOptions,
    ) -> anyhow::Result<Stack> {
        let location = db.to_string_lossy();
        let registry = if in_memory {
            RunRegistry::in_memory()
        } else if is_database_url(&location) {
            let defaults = PostgresOptions::default();
            let options = PostgresOptions {
                node: node.name.clone().unwrap_or(defaults.node),
                lease: node.lease,
                ..PostgresOptions::default()
            };
            RunRegistry::new(PostgresStore::connect(&location, options).await?)
        } else {
            RunRegistry::open_sqlite(db)?
        };
        let config = HostConfig::with_shared_cache(db);
        if let Some(max) = limits.max_concurrent
            && max > config.max_instances as usize
        {
            anyhow::bail!(
                "--max-concurrent {max} is more than the {} runs the WebAssembly engine's \
                 instance pool holds; choose at most that",
                config.max_instances
            );
        }
        let host = ModuleHost::new(config)?;
        let report = host.load_dir(plugins).await?;
        tracing::info!(modules = ?report.loaded, "modules loaded");
        for failure in &report.failed {
            tracing::warn!(path = %failure.path.display(), error = %failure.error, "module not loaded");
        }
        let reloader = if watch {
            Some(host.watch(plugins, DEFAULT_DEBOUNCE)?)
        } else {
            None
        };
        let manager = BackgroundTaskManager::with_limits(registry.clone(), limits);
        let runner = ModuleRunner::new(host, manager);
        if !in_memory && !is_database_url(&location) {
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
        let claimer = if runner.registry().is_shared_queue() {
            Some(runner.claim_from_queue()?)
        } else {
            None
        };
        // Cancels other nodes sharing the registry asked of this one.
        if let Some(mut requests) = registry.take_cancel_requests() {
            let runner = runner.clone();
            tokio::spawn(async move {
                while let Some(run_id) = requests.recv().await {
                    match runner.cancel_here(&run_id).await {
                        Ok(true) => tracing::info!(run_id, "run cancelled as another node asked"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(run_id, error = %e, "cannot cancel a run as another node asked")
                        }
                    }
                }
            });
        }
        Ok(Stack {
            runner,
            _reloader: reloader,
            claimer,
        })
    }

    /// Stops claiming queued runs, then shuts the task manager down
    /// ([`BackgroundTaskManager::shutdown`]): runs still queued stay in the
    /// shared queue for the other nodes.
    pub async fn shutdown(&mut self, grace: Duration) -> modrun::Result<ShutdownReport> {
        if let Some(claimer) = self.claimer.take() {
            claimer.stop().await;
        }
        self.runner.manager().shutdown(grace).await
    }
}

/// The API, listening; its address is written beside the registry for
/// `modrun run` to find, and removed when it stops.
pub struct Listening {
    pub address: String,
    address_file: Option<PathBuf>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Listening {
    /// Serves the API over `runner` on `bind` (loopback, or with a token).
    pub async fn start(
        runner: ModuleRunner,
        bind: SocketAddr,
        token: Option<String>,
        browser: BrowserPolicy,
        address_file: Option<PathBuf>,
    ) -> anyhow::Result<Listening> {
        if !bind.ip().is_loopback() && token.is_none() {
            anyhow::bail!(
                "refusing to listen on {bind} without a token: set --token (or MODRUN_TOKEN), \
                 or bind a loopback address"
            );
        }
        let app = router(AppState::new(runner, token).with_browser_policy(browser));
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("cannot listen on {bind}"))?;
        let address = format!("http://{}", listener.local_addr()?);
        if let Some(file) = &address_file {
            std::fs::write(file, &address)
                .with_context(|| format!("cannot write {}", file.display()))?;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .into_future(),
        );
        Ok(Listening {
            address,
            address_file,
            stop,
            server,
        })
    }

    /// Stops taking requests; event streams get a moment, then are cut.
    pub async fn stop(self) {
        if let Some(file) = &self.address_file {
            let _ = std::fs::remove_file(file);
        }
        let _ = self.stop.send(());
        // Event streams never end on their own: give connections a moment, then go.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.server).await;
    }
}

pub async fn run(options: ServeOptions) -> anyhow::Result<ExitCode> {
    let mut stack = Stack::open(
        &options.plugins,
        &options.db,
        options.in_memory,
        options.limits,
        true,
        &options.node,
    )
    .await?;
    let retention = keep_bounded(stack.runner.clone(), options.retain);
    // `modrun run` finds the server holding the registry beside it.
    let address_file = crate::oneshot::address_file_of(&options.db, options.in_memory);
    let listening = Listening::start(
        stack.runner.clone(),
        options.bind,
        options.token,
        options.browser,
        address_file,
    )
    .await?;
    // Tests and scripts read this line to learn the port of `--bind 127.0.0.1:0`.
    println!("listening on {}", listening.address);

    shutdown_signal().await;
    tracing::info!(grace = ?options.grace, "shutting down: no new runs; waiting for the running ones");
    retention.abort();
    let report = stack.shutdown(options.grace).await;
    listening.stop().await;
    match report {
        Ok(report) => {
            if !report.cancelled.is_empty() {
                tracing::info!(
                    cancelled = report.cancelled.len(),
                    "runs cancelled at shutdown"
                );
            }
            if report.still_running > 0 {
                tracing::warn!(
                    tasks = report.still_running,
                    "work that ignored cancellation is left behind"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            tracing::error!(error = %e, "shutdown could not record everything; unfinished runs are marked interrupted at the next start");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler can be installed");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
