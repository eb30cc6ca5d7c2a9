//! `modrun dev`: the whole inner loop of plugin development in one command.
//! It builds the plugin sources, serves the API over the host it builds
//! into (as `serve` does, runs recorded in the same registry), rebuilds a
//! plugin when its source changes and reloads it at once, and, with
//! `--run`, runs a module after every good build and shows the result. A
//! broken edit prints the compiler's errors once, compactly, and the last
//! good version keeps serving; a manifest change reloads without a build.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use modrun::http::BrowserPolicy;
use modrun::module::{BuiltPlugin, DEFAULT_DEBOUNCE, ReloadEvent, build_plugins, is_source_path};
use modrun::{ModuleRunner, TaskLimits};
use serde_json::Value;

use crate::serve::{Listening, shutdown_signal};

/// How `dev` was asked to run.
pub struct DevOptions {
    pub plugins: PathBuf,
    pub db: PathBuf,
    pub in_memory: bool,
    pub bind: SocketAddr,
    pub token: Option<String>,
    /// Where the plugins are built (default: `<plugins>/target`).
    pub target_dir: Option<PathBuf>,
    /// The module to run after every good build, and its parameters.
    pub run: Option<(String, Value)>,
}

pub async fn run(options: DevOptions) -> anyhow::Result<ExitCode> {
    let plugins = options
        .plugins
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("plugins directory {}: {e}", options.plugins.display()))?;
    let target = options
        .target_dir
        .clone()
        .unwrap_or_else(|| plugins.join("target"));
    let limits = TaskLimits {
        max_concurrent: Some(64),
        max_queued: Some(1024),
    };
    let modrun = crate::serve::open(
        &plugins,
        &options.db,
        options.in_memory,
        limits,
        false,
        &crate::serve::NodeOptions::default(),
        None,
    )
    .await?;
    let host = modrun.host().clone();
    // One watcher for the tree: components and manifests reload the host,
    // source changes ask for a rebuild (one pending rebuild is enough).
    let (changed, mut changes) = tokio::sync::mpsc::channel(1);
    let sources = plugins.clone();
    let _watcher = host.watch_tree(&plugins, DEFAULT_DEBOUNCE, move |paths| {
        if paths.iter().any(|path| is_source_path(&sources, path)) {
            let _ = changed.try_send(());
        }
    })?;
    let mut reloads = host.subscribe();
    // Built once the watcher runs, so that no save is missed; what the
    // build changed is loaded now, before anything is served or run.
    let mut builds = Builds::default();
    for plugin in builds.build(&plugins, &target).await {
        let _ = host.load_file(&plugin.path).await;
    }
    let address_file = crate::oneshot::address_file_of(&options.db, options.in_memory);
    let listening = Listening::start(
        modrun.runner().clone(),
        options.bind,
        options.token.clone(),
        BrowserPolicy::default(),
        address_file,
    )
    .await?;
    println!(
        "serving {} on {}",
        describe_modules(&host.module_ids()),
        listening.address
    );
    for failure in host.failures() {
        println!("not loaded: {}: {}", failure.path.display(), failure.error);
    }
    println!("watching {} for changes; Ctrl-C to stop", plugins.display());
    if builds.broken.is_none() {
        try_run(modrun.runner(), options.run.as_ref());
    }

    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            Some(()) = changes.recv() => {
                let rebuilt = builds.build(&plugins, &target).await;
                // Reload what changed now, not when the watcher gets to it,
                // so that the run below gets the new version.
                for plugin in &rebuilt {
                    let _ = host.load_file(&plugin.path).await;
                }
                if !rebuilt.is_empty() {
                    try_run(modrun.runner(), options.run.as_ref());
                }
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
    let _ = modrun.shutdown(Duration::from_secs(2)).await;
    listening.stop().await;
    Ok(ExitCode::SUCCESS)
}

fn describe_modules(ids: &[String]) -> String {
    if ids.is_empty() {
        "no modules".to_owned()
    } else {
        format!("modules {}", ids.join(", "))
    }
}

/// Runs the `--run` module in the background and shows how it goes.
fn try_run(runner: &ModuleRunner, run: Option<&(String, Value)>) {
    let Some((module_id, parameters)) = run.cloned() else {
        return;
    };
    let runner = runner.clone();
    tokio::spawn(async move {
        println!("running {module_id}");
        if let Err(e) = crate::oneshot::run_and_follow(
            &runner,
            &module_id,
            parameters,
            &modrun::StartOptions::new(),
            false,
        )
        .await
        {
            println!("error: {e:#}");
        }
    });
}

/// Builds, and what the last one left broken.
#[derive(Default)]
struct Builds {
    /// The compiler's errors of the last build, while it failed.
    broken: Option<String>,
}

impl Builds {
    /// Builds the plugins and says how it went; returns the plugins whose
    /// component changed.
    async fn build(&mut self, plugins: &Path, target: &Path) -> Vec<BuiltPlugin> {
        let started = Instant::now();
        let (workspace, target) = (plugins.to_path_buf(), target.to_path_buf());
        let built =
            tokio::task::spawn_blocking(move || build_plugins(&workspace, &target, &workspace))
                .await;
        let took = started.elapsed().as_secs_f64();
        match built {
            Ok(Ok(built)) => {
                if self.broken.take().is_some() {
                    println!("build fixed");
                }
                let changed: Vec<BuiltPlugin> = built.into_iter().filter(|p| p.changed).collect();
                if changed.is_empty() {
                    println!("built in {took:.1}s, nothing changed");
                } else {
                    let ids: Vec<&str> = changed.iter().map(|p| p.id.as_str()).collect();
                    println!("rebuilt {} in {took:.1}s", ids.join(", "));
                }
                changed
            }
            Ok(Err(e)) => {
                let errors = compact_errors(&e.to_string());
                if self.broken.as_deref() != Some(errors.as_str()) {
                    println!(
                        "build failed after {took:.1}s; the last good versions keep serving:\n{errors}"
                    );
                } else {
                    println!("build still fails (the same errors)");
                }
                self.broken = Some(errors);
                Vec::new()
            }
            Err(e) => {
                println!("build stopped: {e}");
                Vec::new()
            }
        }
    }
}

/// The compiler's errors, one line each: `error: FILE:LINE:COL: message`.
/// Where none can be read that way, the end of what it printed.
fn compact_errors(output: &str) -> String {
    let lines: Vec<&str> = output.lines().collect();
    let mut errors = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let Some(message) = line
            .strip_prefix("error")
            .and_then(|rest| rest.split_once(": "))
            .map(|(_, message)| message)
        else {
            continue;
        };
        let place = lines[index + 1..]
            .iter()
            .take(3)
            .find_map(|next| next.trim_start().strip_prefix("--> "));
        match place {
            Some(place) => errors.push(format!("error: {place}: {message}")),
            None if !message.starts_with("could not compile") => {
                errors.push(format!("error: {message}"));
            }
            None => {}
        }
    }
    if errors.is_empty() {
        let tail = lines.len().saturating_sub(20);
        return lines[tail..].join("\n");
    }
    errors.join("\n")
}

#[cfg(test)]
mod tests {
    use super::compact_errors;

    #[test]
    fn compiler_errors_are_one_line_each_with_their_place() {
        let output = "building plugins: cargo build failed:\n   Compiling hello v0.1.0\n\
                      error: expected `;`, found `}`\n  --> hello/src/lib.rs:12:30\n   |\n\
                      12 |     let x = 1\n\n\
                      error[E0425]: cannot find value `y` in this scope\n  --> hello/src/lib.rs:20:5\n\n\
                      error: could not compile `hello` (lib) due to 2 previous errors";
        assert_eq!(
            compact_errors(output),
            "error: hello/src/lib.rs:12:30: expected `;`, found `}`\n\
             error: hello/src/lib.rs:20:5: cannot find value `y` in this scope"
        );
    }
}
