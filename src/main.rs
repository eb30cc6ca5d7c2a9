//! The `modrun` command: build plugins, develop them live, inspect runs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use modrun::module::build_plugins;
use modrun::{Run, RunFilter, RunRegistry, RunStatus};

mod dev;

/// Run sandboxed WebAssembly plugins as tracked background tasks.
#[derive(Parser)]
#[command(name = "modrun", version, about)]
struct Cli {
    /// The run registry (a SQLite file; created if missing).
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
    /// Build the plugin sources (a Cargo workspace) into components.
    Build {
        /// The plugin workspace; components are placed beside its crates.
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
    },
    /// Develop plugins live: rebuild a plugin when its source changes, and
    /// hot-reload the modules (a broken edit keeps the last good version).
    Dev {
        /// The plugin workspace, which is also the plugins directory.
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "modrun=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
                println!("{:<20} {state:<9} {}", plugin.id, plugin.path.display());
            }
            println!(
                "{} plugin(s) in {:.1}s",
                built.len(),
                started.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Dev { plugins } => return dev::run(&plugins, &cli.db).await,
        _ => {}
    }
    let registry = RunRegistry::open_sqlite(&cli.db)?;
    match cli.command {
        Command::Build { .. } | Command::Dev { .. } => unreachable!("handled above"),
        Command::Runs {
            status,
            module,
            limit,
        } => {
            let filter = RunFilter {
                statuses: status,
                module_id: module,
                limit: Some(limit),
            };
            let runs = registry.list_runs(&filter).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                print_runs(&runs);
            }
        }
        Command::Show { run } => {
            let found = registry
                .get_run(&run)
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
