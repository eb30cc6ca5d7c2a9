//! The `modrun` command: serve the API, run a module once, build and develop
//! plugins, inspect and cancel runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::time::Duration;

use modrun::module::build_plugins;
use modrun::registry::SqliteReader;
use modrun::{
    HostConfig, ModuleHost, Run, RunFilter, RunRegistry, RunStatus, StatusChange, TaskLimits,
};

mod dev;
mod oneshot;
mod serve;

/// Run sandboxed WebAssembly plugins as tracked background tasks.
#[derive(Parser)]
#[command(name = "modrun", version, about)]
struct Cli {
    /// The run registry: a SQLite file (created if missing), or a
    /// PostgreSQL database (postgres://user@host:port/db) that several
    /// servers can share.
    #[arg(
        long,
        global = true,
        default_value = ".modrun/registry.db",
        env = "MODRUN_DB"
    )]
    db: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API over the plugins directory (hot reload included).
    Serve {
        /// The address to listen on. Anything but loopback needs --token.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: std::net::SocketAddr,
        /// The plugins directory.
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
        /// Keep runs in memory only, not in --db.
        #[arg(long)]
        in_memory: bool,
        /// A bearer token every request but /health must carry.
        #[arg(long, env = "MODRUN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// On SIGTERM or Ctrl-C, how long running runs may take to finish
        /// before they are cancelled, in seconds.
        #[arg(long, default_value_t = 30.0)]
        grace: f64,
        /// The most runs executing at once; the rest wait, queued.
        #[arg(long, default_value_t = 64)]
        max_concurrent: usize,
        /// The most runs waiting; past it, starts are refused (HTTP 429).
        #[arg(long, default_value_t = 1024)]
        max_queued: usize,
        /// A host name (besides the loopback ones) that browsers may reach
        /// the server under; repeat for more.
        #[arg(long = "allowed-host", value_name = "NAME")]
        allowed_hosts: Vec<String>,
        /// A web origin (https://app.example) whose pages may call the API;
        /// repeat for more. None by default: no CORS.
        #[arg(long = "cors-origin", value_name = "ORIGIN")]
        cors_origins: Vec<String>,
        /// With a PostgreSQL --db: this server's name among the nodes
        /// sharing the database (default: host name and process id).
        #[arg(long, env = "MODRUN_NODE")]
        node: Option<String>,
        /// With a PostgreSQL --db: how long this node's lease lasts, in
        /// seconds. Renewed every sixth of it; once it runs out, the other
        /// nodes fail this node's active runs ("node lost").
        #[arg(long, default_value_t = 30.0)]
        node_lease: f64,
        /// Remove finished runs this long after they end (30d, 12h, 90min),
        /// in the background; `never` keeps them. A module's manifest may
        /// say otherwise for its own runs ([retention]).
        #[arg(long, default_value = "30d", value_name = "DURATION")]
        retain: String,
    },
    /// Remove finished runs completed more than --older-than ago, with
    /// their history and logs (through the server that holds the registry,
    /// if one does). Active runs are never removed.
    Cleanup {
        /// How long ago they ended: 30d, 12h, 90min.
        #[arg(long, value_name = "DURATION")]
        older_than: String,
        /// Only runs in this status (completed, failed, cancelled); repeat for more.
        #[arg(long)]
        status: Vec<RunStatus>,
        /// Only runs of this module.
        #[arg(long)]
        module: Option<String>,
        /// Count what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// The bearer token of the server that holds the registry, if it has one.
        #[arg(long, env = "MODRUN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Run a module once: progress on standard error, output as JSON on
    /// standard output, recorded in the registry (through the server that
    /// holds it, if one does). Exit code: 0 completed, 1 failed, 101
    /// panicked, 124 timed out, 130 cancelled (Ctrl-C), 2 bad request.
    Run {
        /// The module to run.
        module: String,
        /// Parameters as key=value (values that parse as JSON are JSON).
        pairs: Vec<String>,
        /// Parameters as a JSON object (key=value pairs are added to it).
        #[arg(long)]
        params: Option<String>,
        /// The plugins directory.
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
        /// Record nothing: keep the run in this process's memory only.
        #[arg(long)]
        in_memory: bool,
        /// The bearer token of the server that holds the registry, if it has one.
        #[arg(long, env = "MODRUN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Never build the module's plugin source, even when its component
        /// is missing or older than the source.
        #[arg(long)]
        no_build: bool,
        /// How soon the run starts among the runs waiting on a busy server:
        /// higher first (-32768 to 32767; 0 by default).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i16,
        /// Start no earlier than this long from now (500ms, 30s, 2h).
        #[arg(long, conflicts_with = "not_before")]
        delay: Option<String>,
        /// Start no earlier than this time (RFC 3339: 2026-11-26T18:00:00Z).
        #[arg(long)]
        not_before: Option<String>,
    },
    /// List the modules of a plugins directory, the files that fail to
    /// load, and the plugin sources not built yet.
    Modules {
        /// The plugins directory.
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
    },
    /// Cancel a run through a running server.
    Cancel {
        /// The run id.
        run: String,
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "MODRUN_SERVER")]
        server: String,
        /// The server's bearer token, if it has one.
        #[arg(long, env = "MODRUN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// List runs, newest first.
    Runs {
        /// Only runs in this status (queued, running, completed, failed, cancelled).
        #[arg(long)]
        status: Vec<RunStatus>,
        /// Only runs of this module.
        #[arg(long)]
        module: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show one run with its status history.
    Show {
        /// The run id.
        run: String,
    },
    /// Build the plugin sources (Rust, Python, JavaScript, or a declared
    /// command) into components; a missing guest toolchain is installed
    /// into the plugin's folder first. Unchanged plugins are not rebuilt.
    Build {
        /// The plugins directory: each folder in it is one plugin source;
        /// components are placed beside them.
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
    },
    /// Create a new plugin source, PLUGINS/NAME, that builds and runs with
    /// no edits.
    New {
        /// Its folder's name; its module id is the same, with `-` read as `_`.
        name: String,
        /// Its language: rust, python or js.
        #[arg(long, default_value = "rust")]
        lang: modrun::module::Language,
        /// The plugins directory.
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
    },
    /// Develop plugins live: build them, serve the API (as `serve` does),
    /// rebuild a plugin when its source changes and reload it (a broken edit
    /// keeps the last good version), and with --run, run a module after
    /// every good build.
    Dev {
        /// The plugin workspace, which is also the plugins directory.
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
        /// The address to listen on. Anything but loopback needs --token.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: std::net::SocketAddr,
        /// Keep runs in memory only, not in --db.
        #[arg(long)]
        in_memory: bool,
        /// A bearer token every request but /health must carry.
        #[arg(long, env = "MODRUN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Where plugins are built (default: PLUGINS/target).
        #[arg(long)]
        target_dir: Option<PathBuf>,
        /// Run this module after every good build, with key=value parameters:
        /// `--run hello name=Ada`.
        #[arg(long, num_args = 1.., value_name = "MODULE [KEY=VALUE]")]
        run: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server or the dev loop tells what it does; a one-shot command only
    // what went wrong. RUST_LOG overrides both.
    let quiet = !matches!(
        cli.command,
        Command::Serve { .. } | Command::Dev { .. } | Command::Build { .. }
    );
    let default_filter = if quiet { "modrun=warn" } else { "modrun=info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // A blocking thread stuck in a system call must not keep the process
    // alive once the command is done.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Build { plugins } => {
            let started = std::time::Instant::now();
            let built = tokio::task::spawn_blocking(move || {
                build_plugins(&plugins, &plugins.join("target"), &plugins)
            })
            .await??;
            for plugin in &built {
                let state = if plugin.changed { "built" } else { "unchanged" };
                println!(
                    "{:<20} {:<7} {state:<9} {}",
                    plugin.id,
                    plugin.language,
                    plugin.path.display()
                );
            }
            println!(
                "{} plugin(s) in {:.1}s",
                built.len(),
                started.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::New {
            name,
            lang,
            plugins,
        } => {
            let source = modrun::module::new_plugin(&plugins, &name, lang)?;
            println!(
                "created {} ({lang}): module {}",
                source.dir.display(),
                source.id
            );
            println!(
                "run it with: modrun run {} name=Ada --plugins {}",
                source.id,
                plugins.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Dev {
            plugins,
            bind,
            in_memory,
            token,
            target_dir,
            run,
        } => {
            let run = match run.split_first() {
                None => None,
                Some((module, pairs)) => match oneshot::parameters(pairs, None) {
                    Ok(parameters) => Some((module.clone(), parameters)),
                    Err(e) => {
                        eprintln!("error: --run: {e}");
                        return Ok(ExitCode::from(oneshot::EXIT_USAGE));
                    }
                },
            };
            return dev::run(dev::DevOptions {
                plugins,
                db: cli.db,
                in_memory,
                bind,
                token,
                target_dir,
                run,
            })
            .await;
        }
        Command::Serve {
            bind,
            plugins,
            in_memory,
            token,
            grace,
            max_concurrent,
            max_queued,
            allowed_hosts,
            cors_origins,
            node,
            node_lease,
            retain,
        } => {
            let retain = match retain.trim() {
                "never" => None,
                age => Some(
                    modrun::module::parse_age(age)
                        .map_err(|e| anyhow::anyhow!("--retain: {e}, or never"))?,
                ),
            };
            let grace = Duration::try_from_secs_f64(grace)
                .map_err(|_| anyhow::anyhow!("--grace must be a number of seconds, not {grace}"))?;
            let lease = Duration::try_from_secs_f64(node_lease)
                .ok()
                .filter(|lease| lease.as_secs_f64() >= 1.0)
                .ok_or_else(|| {
                    anyhow::anyhow!("--node-lease must be at least 1 second, not {node_lease}")
                })?;
            let limits = TaskLimits {
                max_concurrent: Some(max_concurrent.max(1)),
                max_queued: Some(max_queued),
            };
            let options = serve::ServeOptions {
                bind,
                plugins,
                db: cli.db,
                in_memory,
                token,
                grace,
                limits,
                browser: modrun::http::BrowserPolicy {
                    allowed_hosts,
                    cors_origins,
                },
                node: serve::NodeOptions { name: node, lease },
                retain,
            };
            return serve::run(options).await;
        }
        Command::Run {
            module,
            pairs,
            params,
            plugins,
            in_memory,
            token,
            no_build,
            priority,
            delay,
            not_before,
        } => {
            let parameters =
                oneshot::parameters(&pairs, params.as_deref()).and_then(|parameters| {
                    let options =
                        oneshot::start_options(priority, delay.as_deref(), not_before.as_deref())?;
                    Ok((parameters, options))
                });
            let (parameters, options) = match parameters {
                Ok(parsed) => parsed,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(oneshot::EXIT_USAGE));
                }
            };
            return oneshot::run(oneshot::RunRequest {
                plugins: &plugins,
                db: &cli.db,
                in_memory,
                token: token.as_deref(),
                module_id: &module,
                parameters,
                options,
                no_build,
            })
            .await;
        }
        Command::Modules { plugins } => {
            let host = ModuleHost::new(HostConfig::with_shared_cache(&cli.db))?;
            let report = host.load_dir(&plugins).await?;
            let unbuilt = oneshot::unbuilt_sources(&plugins);
            if cli.json {
                let listing = serde_json::json!({
                    "modules": host.modules(),
                    "failures": report.failed,
                    "unbuilt": unbuilt,
                });
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                println!(
                    "{:<20}  {:<10}  {:<20}  DESCRIPTION",
                    "MODULE", "VERSION", "CONTENT"
                );
                for module in host.modules() {
                    println!(
                        "{:<20}  {:<10}  {:<20}  {}",
                        module.info.id,
                        module.info.version,
                        &module.content_hash[..19.min(module.content_hash.len())],
                        module.info.description
                    );
                }
                for failure in &report.failed {
                    println!("not loaded: {}: {}", failure.path.display(), failure.error);
                }
                for source in &unbuilt {
                    println!(
                        "not built: {} ({}; build it with `modrun build --plugins {}`)",
                        source.dir.display(),
                        source.language,
                        plugins.display()
                    );
                }
                if host.modules().is_empty() && report.failed.is_empty() && unbuilt.is_empty() {
                    println!(
                        "{} holds no modules: add a component (<id>.wasm) or a plugin source",
                        plugins.display()
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Cancel { run, server, token } => return cancel(&server, &run, token.as_deref()),
        Command::Cleanup {
            older_than,
            status,
            module,
            dry_run,
            token,
        } => {
            return oneshot::cleanup(oneshot::CleanupRequest {
                db: &cli.db,
                token: token.as_deref(),
                older_than: &older_than,
                statuses: status,
                module_id: module,
                dry_run,
            })
            .await;
        }
        Command::Runs { .. } | Command::Show { .. } => {}
    }
    let registry = Records::open(&cli.db).await?;
    match cli.command {
        Command::Build { .. }
        | Command::New { .. }
        | Command::Dev { .. }
        | Command::Serve { .. }
        | Command::Run { .. }
        | Command::Modules { .. }
        | Command::Cleanup { .. }
        | Command::Cancel { .. } => unreachable!("handled above"),
        Command::Runs {
            status,
            module,
            limit,
        } => {
            let filter = RunFilter {
                statuses: status,
                module_id: module,
                limit: Some(limit),
                after: None,
            };
            let runs = registry.list(&filter).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                print_runs(&runs);
            }
        }
        Command::Show { run } => {
            let found = registry
                .get(&run)
                .await?
                .with_context(|| format!("no run {run} in {}", cli.db.display()))?;
            let history = registry.history(&run).await?;
            if cli.json {
                let shown = serde_json::json!({"run": found, "history": history});
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&found)?);
                println!("history:");
                for change in history {
                    println!(
                        "  {}  {:<9}  {}",
                        change.at.to_rfc3339(),
                        change.status,
                        change.message.unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The registry as `runs` and `show` read it: opened as its owner when no
/// other process holds it (so runs a crashed process left unfinished are
/// marked interrupted first), or read beside the server that holds it.
enum Records {
    Owned(RunRegistry),
    Shared(SqliteReader),
}

impl Records {
    async fn open(path: &Path) -> modrun::Result<Records> {
        match RunRegistry::open(&path.to_string_lossy()).await {
            Ok(registry) => Ok(Records::Owned(registry)),
            Err(modrun::Error::RegistryInUse { .. }) => {
                Ok(Records::Shared(SqliteReader::open(path)?))
            }
            Err(e) => Err(e),
        }
    }

    async fn list(&self, filter: &RunFilter) -> modrun::Result<Vec<Run>> {
        match self {
            Records::Owned(registry) => registry.list_runs(filter).await,
            Records::Shared(reader) => reader.list(filter),
        }
    }

    async fn get(&self, run_id: &str) -> modrun::Result<Option<Run>> {
        match self {
            Records::Owned(registry) => registry.get_run(run_id).await,
            Records::Shared(reader) => reader.get(run_id),
        }
    }

    async fn history(&self, run_id: &str) -> modrun::Result<Vec<StatusChange>> {
        match self {
            Records::Owned(registry) => registry.history(run_id).await,
            Records::Shared(reader) => reader.history(run_id),
        }
    }
}

fn print_runs(runs: &[Run]) {
    println!(
        "{:<36}  {:<20}  {:<9}  {:<25}  ERROR",
        "RUN", "MODULE", "STATUS", "CREATED"
    );
    for run in runs {
        println!(
            "{:<36}  {:<20}  {:<9}  {:<25}  {}",
            run.run_id,
            run.module_id,
            run.status,
            run.created_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            run.error_message.as_deref().unwrap_or("")
        );
    }
}

/// Cancels a run through a server's API: exit 0 when cancelled, 1 when it
/// had already finished, 2 when the server does not know it.
fn cancel(server: &str, run_id: &str, token: Option<&str>) -> anyhow::Result<ExitCode> {
    let url = format!("{}/runs/{run_id}", server.trim_end_matches('/'));
    let mut request = ureq::delete(&url);
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .with_context(|| format!("cannot reach the server at {server}"))?;
    let status = response.status().as_u16();
    let body: serde_json::Value = response.body_mut().read_json().unwrap_or_default();
    match status {
        200 => {
            println!("cancelled {run_id}");
            Ok(ExitCode::SUCCESS)
        }
        409 => {
            println!("run {run_id} had already finished: {}", body["status"]);
            Ok(ExitCode::FAILURE)
        }
        _ => {
            let message = body["error"]["message"]
                .as_str()
                .unwrap_or("no reason given");
            eprintln!("error: the server answered {status}: {message}");
            Ok(ExitCode::from(2))
        }
    }
}
