//! `modrun serve`: the HTTP API over the plugins directory, with the run
//! registry in SQLite, hot reload, and a graceful shutdown. `modrun dev`
//! serves the same way ([`open`], [`Listening`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use modrun::http::{AppState, BrowserPolicy, router};
use modrun::module::shared_cache_dir;
use modrun::{HostConfig, Modrun, ModuleRunner, TaskLimits};

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

/// What a server is made of ([`Modrun`]): the registry (`db`, or
/// memory), a host that caches compiled modules beside the registry with
/// `plugins` loaded (and, with `watch`, kept in step with the directory),
/// and a runner over them; on a shared database, this node's share of the
/// queue.
pub async fn open(
    plugins: &Path,
    db: &Path,
    in_memory: bool,
    limits: TaskLimits,
    watch: bool,
    node: &NodeOptions,
    retain: Option<Duration>,
) -> anyhow::Result<Modrun> {
    let max_instances = HostConfig::default().max_instances;
    if let Some(max) = limits.max_concurrent
        && max > max_instances as usize
    {
        anyhow::bail!(
            "--max-concurrent {max} is more than the {max_instances} runs the WebAssembly \
             engine's instance pool holds; choose at most that"
        );
    }
    let builder = Modrun::builder()
        .plugins(plugins)
        .limits(limits)
        .hot_reload(watch)
        .cache_dir(shared_cache_dir(db))
        .lease(node.lease);
    let builder = if let Some(name) = &node.name {
        builder.node(name)
    } else {
        builder
    };
    let builder = match retain {
        Some(age) => builder.retain(age),
        None => builder,
    };
    let builder = if in_memory {
        builder.in_memory()
    } else {
        builder.store(&db.to_string_lossy())
    };
    let modrun = builder.build().await?;
    tracing::info!(modules = ?modrun.loaded().loaded, "modules loaded");
    for failure in &modrun.loaded().failed {
        tracing::warn!(path = %failure.path.display(), error = %failure.error, "module not loaded");
    }
    Ok(modrun)
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
    let modrun = open(
        &options.plugins,
        &options.db,
        options.in_memory,
        options.limits,
        true,
        &options.node,
        options.retain,
    )
    .await?;
    // `modrun run` finds the server holding the registry beside it.
    let address_file = crate::oneshot::address_file_of(&options.db, options.in_memory);
    let listening = Listening::start(
        modrun.runner().clone(),
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
    let report = modrun.shutdown(options.grace).await;
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
