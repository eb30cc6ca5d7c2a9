//! `modrun dev`: the plugin development loop. Watches the plugin sources,
//! rebuilds on change, and lets the host's reloader pick up the new
//! components; a broken edit prints the compiler's errors and leaves the
//! last good version serving.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use modrun::module::{DEFAULT_DEBOUNCE, ReloadEvent, build_plugins, changes_content};
use modrun::{HostConfig, ModuleHost};
use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};

/// How long sources must be quiet before a rebuild: editors save in bursts.
const SOURCE_DEBOUNCE: Duration = Duration::from_millis(200);

pub async fn run(plugins: &Path, db: &Path) -> anyhow::Result<ExitCode> {
    let plugins = plugins
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("plugins directory {}: {e}", plugins.display()))?;
    rebuild(&plugins).await;

    let cache = db.parent().unwrap_or(Path::new(".")).join("cache");
    let host = ModuleHost::new(HostConfig {
        cache_dir: Some(cache),
        ..HostConfig::default()
    })?;
    let report = host.load_dir(&plugins).await?;
    let mut reloads = host.subscribe();
    println!("serving modules: {}", report.loaded.join(", "));
    for failure in &report.failed {
        println!("not loaded: {}: {}", failure.path.display(), failure.error);
    }
    let _reloader = host.watch(&plugins, DEFAULT_DEBOUNCE)?;

    let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let sources = plugins.clone();
    let mut watcher = new_debouncer(SOURCE_DEBOUNCE, None, move |result: DebounceEventResult| {
        if let Ok(events) = result
            && events
                .iter()
                .any(|e| changes_content(&e.kind) && e.paths.iter().any(|p| is_source(&sources, p)))
        {
            let _ = changed.send(());
        }
    })?;
    watcher.watch(&plugins, RecursiveMode::Recursive)?;
    println!("watching {} for changes; Ctrl-C to stop", plugins.display());

    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            Some(()) = changes.recv() => {
                while changes.try_recv().is_ok() {}
                rebuild(&plugins).await;
            }
            Ok(event) = reloads.recv() => match event {
                ReloadEvent::Loaded { module_id, content_hash } => {
                    println!("reloaded {module_id} ({})", &content_hash[..19.min(content_hash.len())]);
                }
                ReloadEvent::Failed { path, error } => {
                    println!("not reloaded, the last good version serves: {}: {error}", path.display());
                }
                ReloadEvent::Retired { module_id } => println!("retired {module_id}"),
            },
        }
    }
}

/// Whether a changed path is plugin source: a crate's `src/` or a
/// `Cargo.toml`, not build output, components or manifests.
fn is_source(workspace: &Path, path: &Path) -> bool {
    let Ok(relative) = path.strip_prefix(workspace) else {
        return false;
    };
    let parts: Vec<_> = relative.components().collect();
    match parts.as_slice() {
        [file] => file.as_os_str() == "Cargo.toml",
        [first, rest @ ..] if first.as_os_str() != "target" => {
            rest.first().is_some_and(|p| p.as_os_str() == "src")
                || (rest.len() == 1 && rest[0].as_os_str() == "Cargo.toml")
        }
        _ => false,
    }
}

async fn rebuild(plugins: &Path) {
    let started = Instant::now();
    let workspace: PathBuf = plugins.to_path_buf();
    let built = tokio::task::spawn_blocking(move || {
        build_plugins(&workspace, &workspace.join("target"), &workspace)
    })
    .await;
    let took = started.elapsed().as_secs_f64();
    match built {
        Ok(Ok(built)) => {
            let changed: Vec<_> = built
                .iter()
                .filter(|p| p.changed)
                .map(|p| p.id.as_str())
                .collect();
            if changed.is_empty() {
                println!("built in {took:.1}s, nothing changed");
            } else {
                println!("rebuilt {} in {took:.1}s", changed.join(", "));
            }
        }
        Ok(Err(e)) => {
            println!("build failed after {took:.1}s; the last good versions keep serving\n{e}")
        }
        Err(e) => println!("build stopped: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::is_source;
    use std::path::Path;

    #[test]
    fn sources_are_crate_sources_and_manifests() {
        let root = Path::new("/w/plugins");
        let source = |p: &str| is_source(root, &root.join(p));
        assert!(source("hello/src/lib.rs"));
        assert!(source("hello/src/deep/mod.rs"));
        assert!(source("hello/Cargo.toml"));
        assert!(source("Cargo.toml"));
        assert!(!source("hello.wasm"));
        assert!(!source("hello.toml"));
        assert!(!source("target/wasm32-wasip2/release/hello.wasm"));
        assert!(!source("hello/README.md"));
    }
}
