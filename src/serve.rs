//! `modrun serve`: the HTTP API over the plugins directory, with the run
//! registry in SQLite, hot reload, and a graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use modrun::http::{AppState, BrowserPolicy, router};
use modrun::module::DEFAULT_DEBOUNCE;
use modrun::{
    BackgroundTaskManager, HostConfig, ModuleHost, ModuleRunner, RunRegistry, TaskLimits,
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
}

pub async fn run(options: ServeOptions) -> anyhow::Result<ExitCode> {
    if !options.bind.ip().is_loopback() && options.token.is_none() {
        anyhow::bail!(
            "refusing to listen on {} without a token: set --token (or MODRUN_TOKEN), \
             or bind a loopback address",
            options.bind
        );
    }
    let registry = if options.in_memory {
        RunRegistry::in_memory()
    } else {
        RunRegistry::open_sqlite(&options.db)?
    };
    let cache = options.db.parent().unwrap_or(Path::new(".")).join("cache");
    let config = HostConfig {
        cache_dir: Some(cache),
        ..HostConfig::default()
    };
    if let Some(max) = options.limits.max_concurrent
        && max > config.max_instances as usize
    {
        anyhow::bail!(
            "--max-concurrent {max} is more than the {} runs the WebAssembly engine's \
             instance pool holds; choose at most that",
            config.max_instances
        );
    }
    let host = ModuleHost::new(config)?;
    let report = host.load_dir(&options.plugins).await?;
    tracing::info!(modules = ?report.loaded, "modules loaded");
    let _reloader = host.watch(&options.plugins, DEFAULT_DEBOUNCE)?;
    let manager = BackgroundTaskManager::with_limits(registry.clone(), options.limits);
    let runner = ModuleRunner::new(host, manager.clone());
    let app = router(AppState::new(runner, options.token).with_browser_policy(options.browser));

    let listener = tokio::net::TcpListener::bind(options.bind)
        .await
        .with_context(|| format!("cannot listen on {}", options.bind))?;
    let address = format!("http://{}", listener.local_addr()?);
    // `modrun run` finds the server holding the registry here.
    let address_file = (!options.in_memory).then(|| crate::oneshot::address_file(&options.db));
    if let Some(file) = &address_file {
        std::fs::write(file, &address)
            .with_context(|| format!("cannot write {}", file.display()))?;
    }
    // Tests and scripts read this line to learn the port of `--bind 127.0.0.1:0`.
    println!("listening on {address}");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    shutdown_signal().await;
    tracing::info!(grace = ?options.grace, "shutting down: no new runs; waiting for the running ones");
    let report = manager.shutdown(options.grace).await;
    if let Some(file) = &address_file {
        let _ = std::fs::remove_file(file);
    }
    let _ = stop.send(());
    // Event streams never end on their own: give connections a moment, then go.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
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

async fn shutdown_signal() {
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
