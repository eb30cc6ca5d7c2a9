//! `modrun run MODULE key=value…`: one run, with a progress bar fed by the
//! module's progress calls, its log on standard error, its output as JSON
//! on standard output, and an exit code that tells success, failure,
//! timeout and cancel apart. Ctrl-C cancels the run.
//!
//! The run is recorded like any other: in the registry (`--db`), executed
//! in this process; or, when a `modrun serve` holds that registry, started
//! and followed through its API. `--in-memory` records nothing.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use modrun::module::PluginSource;
use modrun::registry::{Cleanup, RunEvent, is_database_url};
use modrun::{
    BackgroundTaskManager, HostConfig, ModuleHost, ModuleRunner, Run, RunRegistry, RunStatus,
    StartOptions,
};
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

/// The start options `modrun run --priority --delay --not-before` say.
pub fn start_options(
    priority: i16,
    delay: Option<&str>,
    not_before: Option<&str>,
) -> anyhow::Result<StartOptions> {
    let options = StartOptions::new().priority(priority);
    Ok(match (delay, not_before) {
        (Some(delay), _) => options
            .delay(modrun::module::parse_delay(delay).map_err(|e| anyhow::anyhow!("--delay {e}"))?),
        (None, Some(at)) => options.not_before(
            modrun::module::parse_start_time(at)
                .map_err(|e| anyhow::anyhow!("--not-before {e}"))?,
        ),
        (None, None) => options,
    })
}

/// What `modrun run` was asked to do.
pub struct RunRequest<'a> {
    pub plugins: &'a Path,
    pub db: &'a Path,
    pub in_memory: bool,
    pub token: Option<&'a str>,
    pub module_id: &'a str,
    pub parameters: Value,
    /// Its priority and not-before time.
    pub options: StartOptions,
    /// Never build a plugin source whose component is missing or stale.
    pub no_build: bool,
}

/// Runs a module once, recorded like any other run: in the registry at
/// `db`, or, when a server holds that registry, through the server's API.
/// With `in_memory`, nothing is recorded.
pub async fn run(request: RunRequest<'_>) -> anyhow::Result<ExitCode> {
    if let Err(e) = ensure_built(request.plugins, request.module_id, request.no_build).await {
        eprintln!("error: {e:#}");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    if request.in_memory {
        return run_here(&request, RunRegistry::in_memory()).await;
    }
    // A database server is shared: this process records its run there
    // beside any server. A SQLite file is held by one process at a time.
    match RunRegistry::open(&request.db.to_string_lossy()).await {
        Ok(registry) => {
            let code = run_here(&request, registry.clone()).await;
            registry.flush().await?;
            code
        }
        Err(modrun::Error::RegistryInUse { .. }) => {
            let base = server_address(request.db)?;
            run_through_server(&request, &base).await
        }
        Err(e) => Err(e.into()),
    }
}

/// What `modrun cleanup` removes.
pub struct CleanupRequest<'a> {
    pub db: &'a Path,
    pub token: Option<&'a str>,
    pub older_than: &'a str,
    pub statuses: Vec<RunStatus>,
    pub module_id: Option<String>,
    pub dry_run: bool,
}

/// Removes finished runs (or counts them, with `dry_run`) from the
/// registry at `db`, or through the server that holds it, and says how
/// many.
pub async fn cleanup(request: CleanupRequest<'_>) -> anyhow::Result<ExitCode> {
    let age = match modrun::module::parse_age(request.older_than) {
        Ok(age) => age,
        Err(e) => {
            eprintln!("error: --older-than: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    if let Some(active) = request.statuses.iter().find(|s| s.is_active()) {
        eprintln!("error: {active} runs are active and never removed; choose finished statuses");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let cleanup = Cleanup {
        statuses: request.statuses.clone(),
        module_id: request.module_id.clone(),
        ..Cleanup::older_than(age)
    };
    let (removed, before) = match RunRegistry::open(&request.db.to_string_lossy()).await {
        Ok(registry) => {
            let removed = if request.dry_run {
                registry.count_finished(&cleanup).await?
            } else {
                registry.cleanup(&cleanup).await?
            };
            registry.flush().await?;
            (removed, cleanup.before.to_rfc3339())
        }
        Err(modrun::Error::RegistryInUse { .. }) => {
            let api = Api {
                base: server_address(request.db)?,
                token: request.token.map(str::to_owned),
            };
            let body = serde_json::json!({
                "older_than": request.older_than,
                "statuses": request.statuses,
                "module_id": request.module_id,
                "dry_run": request.dry_run,
            });
            let (status, answer) =
                tokio::task::spawn_blocking(move || api.send("POST", "/cleanup", Some(&body)))
                    .await??;
            if status != 200 {
                eprintln!(
                    "error: the server answered {status}: {}",
                    answer["error"]["message"]
                        .as_str()
                        .unwrap_or("no reason given")
                );
                return Ok(ExitCode::from(if status == 400 { EXIT_USAGE } else { 1 }));
            }
            let removed = answer["removed"].as_u64().unwrap_or(0);
            let before = answer["before"].as_str().unwrap_or("?").to_owned();
            (usize::try_from(removed).unwrap_or(usize::MAX), before)
        }
        Err(e) => return Err(e.into()),
    };
    let verb = if request.dry_run {
        "would remove"
    } else {
        "removed"
    };
    println!("{verb} {removed} finished run(s) completed before {before}");
    Ok(ExitCode::SUCCESS)
}

/// Where a server over `db` writes its address: beside a SQLite file, and
/// nowhere for memory or a database server (which many processes share).
#[must_use]
pub fn address_file_of(db: &Path, in_memory: bool) -> Option<PathBuf> {
    (!in_memory && !is_database_url(&db.to_string_lossy())).then(|| address_file(db))
}

/// The file beside a registry where `serve` writes the address it listens
/// on, so that `modrun run` finds the server that holds the registry.
#[must_use]
pub fn address_file(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".server");
    PathBuf::from(name)
}

fn server_address(db: &Path) -> anyhow::Result<String> {
    let file = address_file(db);
    let address = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "the registry {} is held by another modrun process that says nowhere where it \
             listens ({} is missing); stop it, or pass --db to use another registry, or \
             --in-memory to record nothing",
            db.display(),
            file.display()
        )
    })?;
    Ok(address.trim().to_owned())
}

/// The plugin sources of `plugins` that have no component beside them yet.
pub fn unbuilt_sources(plugins: &Path) -> Vec<PluginSource> {
    modrun::module::plugin_sources(plugins)
        .into_iter()
        .filter(|source| !plugins.join(format!("{}.wasm", source.id)).exists())
        .collect()
}

/// Builds the plugins of `plugins` when `module_id` has a source whose
/// component is missing or older than it; with `no_build`, says what to
/// run instead.
async fn ensure_built(plugins: &Path, module_id: &str, no_build: bool) -> anyhow::Result<()> {
    let Some(source) = modrun::module::plugin_sources(plugins)
        .into_iter()
        .find(|source| source.id == module_id)
    else {
        return Ok(());
    };
    let component = plugins.join(format!("{module_id}.wasm"));
    let built_at = std::fs::metadata(&component)
        .and_then(|m| m.modified())
        .ok();
    let stale = match built_at {
        None => true,
        Some(built_at) => source
            .newest_change()
            .is_some_and(|changed| changed > built_at),
    };
    if !stale {
        return Ok(());
    }
    let why = if built_at.is_none() {
        "is not built yet"
    } else {
        "changed since it was built"
    };
    if no_build {
        anyhow::bail!(
            "the plugin source {} {why}: build it with `modrun build --plugins {}` (or run \
             without --no-build)",
            source.dir.display(),
            plugins.display()
        );
    }
    eprintln!(
        "building {} ({}): its source {why}",
        source.dir.display(),
        source.language
    );
    let (workspace, id) = (plugins.to_path_buf(), module_id.to_owned());
    let built = tokio::task::spawn_blocking(move || {
        modrun::module::build_plugin(&workspace, &id, &workspace.join("target"), &workspace)
    })
    .await??;
    let Some(plugin) = built.iter().find(|plugin| plugin.id == module_id) else {
        anyhow::bail!(
            "building {} made no component {module_id}.wasm",
            source.dir.display()
        );
    };
    if !plugin.changed {
        // Built from the same sources (only their times changed): the
        // component is current, and says so for the next run.
        let _ = std::fs::File::options()
            .write(true)
            .open(&plugin.path)
            .and_then(|file| file.set_modified(std::time::SystemTime::now()));
    }
    Ok(())
}

/// The modules a plugins directory holds (its `.wasm` files), by id.
fn modules_in(plugins: &Path) -> Vec<String> {
    modrun::module::component_files(plugins)
        .unwrap_or_default()
        .iter()
        .filter_map(|path| Some(path.file_stem()?.to_string_lossy().into_owned()))
        .collect()
}

/// Runs the module in this process, recording it in `registry`. Only that
/// module is loaded, through the compiled cache every command shares.
async fn run_here(request: &RunRequest<'_>, registry: RunRegistry) -> anyhow::Result<ExitCode> {
    let module_id = request.module_id;
    let host = ModuleHost::new(HostConfig::with_shared_cache(request.db))?;
    let file = request.plugins.join(format!("{module_id}.wasm"));
    if modrun::module::ModuleId::is_valid(module_id) && !file.exists() {
        let here = modules_in(request.plugins);
        let listed = if here.is_empty() {
            format!("{} holds no modules", request.plugins.display())
        } else {
            format!("modules here: {}", here.join(", "))
        };
        eprintln!(
            "error: no module {module_id:?}: {} does not exist ({listed})",
            file.display()
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    if let Err(e) = host.load_module(request.plugins, module_id).await {
        eprintln!("error: module {module_id} did not load: {e}");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let runner = ModuleRunner::new(host, BackgroundTaskManager::new(registry.clone()));
    run_and_follow(
        &runner,
        module_id,
        request.parameters.clone(),
        &request.options,
        true,
    )
    .await
}

/// Starts a run of `module_id` with `runner` and shows it until it ends
/// (Ctrl-C cancels it, with `cancel_on_ctrl_c`): its progress and log as
/// they come, then its output or failure. Returns its exit code, or
/// [`EXIT_USAGE`] when the start is refused.
pub async fn run_and_follow(
    runner: &ModuleRunner,
    module_id: &str,
    parameters: Value,
    options: &StartOptions,
    cancel_on_ctrl_c: bool,
) -> anyhow::Result<ExitCode> {
    let registry = runner.registry();
    let mut events = registry.subscribe();
    let run_id = match runner.start_with(module_id, parameters, options).await {
        Ok(run_id) => run_id,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let display = Display::new();
    let ctrl_c = async {
        if cancel_on_ctrl_c {
            let _ = tokio::signal::ctrl_c().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(ctrl_c);
    let mut cancelled = false;
    loop {
        tokio::select! {
            () = &mut ctrl_c, if !cancelled => {
                cancelled = true;
                runner.cancel(&run_id).await?;
            }
            event = events.recv() => match event {
                Ok(event) if event.run_id() == run_id => {
                    if display.show(&event) {
                        break;
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    display.finish();
    // The terminal status is committed before its event; the log with it.
    let run = registry
        .get_run(&run_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("run {run_id} vanished"))?;
    report_end(&run, &display)
}

/// Starts the run through the server at `base` and follows its event
/// stream; Ctrl-C cancels it there.
async fn run_through_server(request: &RunRequest<'_>, base: &str) -> anyhow::Result<ExitCode> {
    let api = Api {
        base: base.trim_end_matches('/').to_owned(),
        token: request.token.map(str::to_owned),
    };
    let mut path = format!(
        "/modules/{}/runs?priority={}",
        request.module_id, request.options.priority
    );
    if let Some(at) = request.options.not_before {
        // RFC 3339 in UTC ("Z"): nothing in it needs escaping in a query.
        path.push_str("&not_before=");
        path.push_str(&at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true));
    }
    let (status, body) = api.send("POST", &path, Some(&request.parameters))?;
    if status != 202 {
        eprintln!(
            "error: the server at {base} answered {status}: {}",
            body["error"]["message"]
                .as_str()
                .unwrap_or("no reason given")
        );
        let usage = [400, 404, 415, 422].contains(&status);
        return Ok(ExitCode::from(if usage { EXIT_USAGE } else { 1 }));
    }
    let run_id = body["run_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the server's answer has no run id: {body}"))?
        .to_owned();

    let (events, mut received) = tokio::sync::mpsc::channel(256);
    let follower = {
        let (api, run_id) = (api.clone(), run_id.clone());
        tokio::task::spawn_blocking(move || api.follow(&run_id, &events))
    };
    let display = Display::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                let (api, path) = (api.clone(), format!("/runs/{run_id}"));
                tokio::task::spawn_blocking(move || api.send("DELETE", &path, None)).await??;
            }
            event = received.recv() => match event {
                Some(event) => {
                    if display.show(&event) {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    display.finish();
    follower.await??;
    let (status, body) = api.send("GET", &format!("/runs/{run_id}"), None)?;
    if status != 200 {
        anyhow::bail!("the server answered {status} for run {run_id}: {body}");
    }
    let run: Run = serde_json::from_value(body["run"].clone())?;
    report_end(&run, &display)
}

/// A server's API, as `modrun run` uses it.
#[derive(Clone)]
struct Api {
    base: String,
    token: Option<String>,
}

impl Api {
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}{path}", self.base);
        let request = ureq::http::Request::builder().method(method).uri(&url);
        let request = match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let response = match body {
            Some(body) => agent.run(
                request
                    .header("Content-Type", "application/json")
                    .body(serde_json::to_vec(body)?)?,
            ),
            None => agent.run(request.body(())?),
        };
        let mut response =
            response.with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_json().unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Reads the run's event stream, passing on its events, until the run
    /// is over. Blocking.
    fn follow(
        &self,
        run_id: &str,
        events: &tokio::sync::mpsc::Sender<RunEvent>,
    ) -> anyhow::Result<()> {
        let mut request = ureq::get(format!("{}/events?run_id={run_id}", self.base));
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let response = request
            .call()
            .with_context(|| format!("cannot follow run {run_id} at {}", self.base))?;
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        let (mut name, mut data) = (String::new(), String::new());
        for line in std::io::BufRead::lines(reader) {
            let line = line?;
            if let Some(value) = line.strip_prefix("event:") {
                name = value.trim().to_owned();
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                let event = match name.as_str() {
                    // The state when we connected: a run already over ends it.
                    "snapshot" => {
                        let run: Run = serde_json::from_str(&data)?;
                        run.status.is_terminal().then(|| RunEvent::Status {
                            run_id: run.run_id.clone(),
                            module_id: run.module_id.clone(),
                            change: modrun::StatusChange {
                                status: run.status,
                                at: run.completed_at.unwrap_or(run.created_at),
                                message: run.error_message.clone(),
                            },
                        })
                    }
                    "status" | "progress" | "log" => Some(serde_json::from_str(&data)?),
                    _ => None,
                };
                data.clear();
                if let Some(event) = event {
                    let over = matches!(&event, RunEvent::Status { change, .. } if change.status.is_terminal());
                    if events.blocking_send(event).is_err() || over {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Shows a run's progress and log as they come: a progress bar on a
/// terminal, plain lines otherwise.
struct Display {
    bar: Option<ProgressBar>,
    /// How many log lines were shown as they came.
    logged: std::cell::Cell<usize>,
}

impl Display {
    fn new() -> Display {
        Display {
            bar: progress_bar(),
            logged: std::cell::Cell::new(0),
        }
    }

    /// Shows one event; returns whether the run is over.
    fn show(&self, event: &RunEvent) -> bool {
        match event {
            RunEvent::Progress { progress, .. } => match &self.bar {
                Some(bar) => {
                    bar.set_position((progress.fraction * 1000.0) as u64);
                    bar.set_message(progress.message.clone());
                }
                None => eprintln!("[{:>3.0}%] {}", progress.fraction * 100.0, progress.message),
            },
            RunEvent::Log { entry, .. } => {
                self.logged.set(self.logged.get() + 1);
                match &self.bar {
                    Some(bar) => bar.println(log_line(entry)),
                    None => eprintln!("{}", log_line(entry)),
                }
            }
            RunEvent::Status { change, .. } => return change.status.is_terminal(),
        }
        false
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn log_line(entry: &modrun::LogEntry) -> String {
    let level = format!("{:?}", entry.level).to_lowercase();
    format!("[{level}] {}", entry.message)
}

/// Prints how a run ended (the log lines not shown as they came, and its
/// captured output, on standard error; its result on standard output) and
/// gives its exit code.
fn report_end(run: &Run, display: &Display) -> anyhow::Result<ExitCode> {
    let (logged, captured): (Vec<_>, Vec<_>) = run
        .log
        .iter()
        .partition(|e| e.source == modrun::LogSource::Log);
    for entry in logged.into_iter().skip(display.logged.get()) {
        eprintln!("{}", log_line(entry));
    }
    for entry in captured {
        eprintln!("{}", entry.message);
    }
    match run.status {
        RunStatus::Completed => {
            println!(
                "{}",
                serde_json::to_string_pretty(run.output.as_ref().unwrap_or(&Value::Null))?
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
