//! `modrun run MODULE key=value…`: one run in this process, with a progress
//! bar fed by the module's progress calls, its log on standard error, its
//! output as JSON on standard output, and an exit code that tells success,
//! failure, timeout and cancel apart. Ctrl-C cancels the run.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use modrun::registry::RunEvent;
use modrun::{BackgroundTaskManager, HostConfig, ModuleHost, ModuleRunner, RunRegistry, RunStatus};
use serde_json::{Map, Value};

/// The exit code for a command-line mistake (bad parameters, unknown module).
pub const EXIT_USAGE: u8 = 2;

/// Parameters from `key=value` pairs (a value that parses as JSON is taken
/// as JSON: `times=3` is a number, `name=Ada` a string) or a JSON object.
pub fn parameters(pairs: &[String], json: Option<&str>) -> anyhow::Result<Value> {
    let mut parameters = match json {
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => anyhow::bail!("--params must be a JSON object"),
            Err(e) => anyhow::bail!("--params is not valid JSON: {e}"),
        },
        None => Map::new(),
    };
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("{pair:?} is not key=value"))?;
        if key.is_empty() {
            anyhow::bail!("{pair:?} has no key before '='");
        }
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        parameters.insert(key.to_owned(), value);
    }
    Ok(Value::Object(parameters))
}

pub async fn run(plugins: &Path, module_id: &str, parameters: Value) -> anyhow::Result<ExitCode> {
    let host = ModuleHost::new(HostConfig::default())?;
    let report = host.load_dir(plugins).await?;
    if !report.loaded.iter().any(|id| id == module_id)
        && let Some(failure) = report
            .failed
            .iter()
            .find(|f| f.path.file_stem().is_some_and(|s| s == module_id))
    {
        eprintln!("error: module {module_id} did not load: {}", failure.error);
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let registry = RunRegistry::in_memory();
    let mut events = registry.subscribe();
    let manager = BackgroundTaskManager::new(registry.clone());
    let runner = ModuleRunner::new(host, manager.clone());
    let run_id = match runner.start(module_id, parameters).await {
        Ok(run_id) => run_id,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };

    let bar = progress_bar();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                runner.cancel(&run_id).await?;
            }
            event = events.recv() => match event {
                Ok(RunEvent::Progress { progress, .. }) => match &bar {
                    Some(bar) => {
                        bar.set_position((progress.fraction * 1000.0) as u64);
                        bar.set_message(progress.message);
                    }
                    None => eprintln!("[{:>3.0}%] {}", progress.fraction * 100.0, progress.message),
                },
                Ok(RunEvent::Log { entry, .. }) => {
                    let level = format!("{:?}", entry.level).to_lowercase();
                    let line = format!("[{level}] {}", entry.message);
                    match &bar {
                        Some(bar) => bar.println(line),
                        None => eprintln!("{line}"),
                    }
                }
                Ok(RunEvent::Status { change, .. }) if change.status.is_terminal() => break,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    manager.wait_all().await;
    let run = registry
        .get_run(&run_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("run {run_id} vanished"))?;
    for entry in run
        .log
        .iter()
        .filter(|e| e.source != modrun::LogSource::Log)
    {
        eprint!("{}", entry.message);
    }
    match run.status {
        RunStatus::Completed => {
            println!(
                "{}",
                serde_json::to_string_pretty(&run.output.unwrap_or(Value::Null))?
            );
        }
        status => eprintln!(
            "run {status}: {}",
            run.error_message.as_deref().unwrap_or("no reason recorded")
        ),
    }
    let code = run.exit_code.unwrap_or(1).clamp(0, 255);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// A progress bar on a terminal; plain lines otherwise.
fn progress_bar() -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(1000);
    let style = ProgressStyle::with_template("{bar:40} {percent:>3}% {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}
