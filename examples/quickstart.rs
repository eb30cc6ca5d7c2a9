//! The task-management guide's Quick Start, in Rust and with real modules:
//! modrun over `plugins/` with runs kept in a SQLite file, a run of `hello`
//! and one of `countdown` followed through its handle's events, the
//! countdown cancelled a third of the way, and each run's end awaited.
//!
//! Run it with `cargo run --release --example quickstart`. It first builds
//! the bundled plugin sources into `plugins/*.wasm` (quick when nothing
//! changed). Runs are kept in `.modrun/registry.db`: `cargo run -- runs`
//! lists them afterwards.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use modrun::module::build_plugins;
use modrun::{Modrun, RunEvent, TaskLimits};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let plugins = root.join("plugins");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("plugins");
    println!("building the bundled plugins…");
    for plugin in build_plugins(&plugins, &target, &plugins)? {
        println!("  {} -> {}", plugin.id, plugin.path.display());
    }

    // The guide's setup — a registry and a task manager with limits — and
    // the module host over plugins/, in one: compiled modules are cached
    // beside the registry file, so the next start compiles nothing.
    let modrun = Modrun::builder()
        .plugins(&plugins)
        .sqlite(root.join(".modrun/registry.db"))
        .limits(TaskLimits {
            max_concurrent: Some(8),
            max_queued: Some(100),
        })
        .build()
        .await?;
    println!("loaded modules: {}", modrun.loaded().loaded.join(", "));
    for failure in &modrun.loaded().failed {
        println!(
            "  not loaded: {}: {}",
            failure.path.display(),
            failure.error
        );
    }

    // Fire and forget: each start returns a handle once the run is recorded.
    let hello = modrun
        .start("hello", json!({"name": "Ada", "times": 3}))
        .await?;
    let countdown = modrun
        .start("countdown", json!({"seconds": 6, "step_ms": 250}))
        .await?;
    println!("started hello {hello} and countdown {countdown}");

    // Follow the countdown's own events until it ends; cancel it a third
    // of the way through.
    let mut events = countdown.events();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), events.next()).await? {
        match event {
            RunEvent::Status { change, .. } => println!("countdown  {}", change.status),
            RunEvent::Progress { progress, .. } => {
                println!(
                    "countdown  {:>3.0}%  {}",
                    progress.fraction * 100.0,
                    progress.message
                );
                if progress.fraction >= 1.0 / 3.0 {
                    countdown.cancel().await?;
                }
            }
            RunEvent::Log { entry, .. } => println!("countdown  log: {}", entry.message),
        }
    }

    // Each handle waits for its run's end (one that came first included).
    for handle in [&hello, &countdown] {
        let run = handle.wait().await?;
        println!("\n{} ({}): {}", run.module_name, run.run_id, run.status);
        if let Some(output) = &run.output {
            println!("  output: {output}");
        }
        if let Some(error) = &run.error_message {
            println!("  error: {error}");
        }
        for change in modrun.registry().history(handle).await? {
            println!("  {}  {}", change.at.format("%H:%M:%S%.3f"), change.status);
        }
    }
    modrun.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}
