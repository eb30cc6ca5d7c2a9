//! Plugins in Python and JavaScript, built by `modrun build` from
//! `examples/polyglot` (the guest toolchains installed by the same build),
//! and `modrun new` in all three languages. Each component is compiled
//! once: every host here loads it from one compiled cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use modrun::run::{EXIT_FAILURE, EXIT_TIMEOUT};
use modrun::{
    BackgroundTaskManager, HostConfig, LogLevel, LogSource, ModuleHost, ModuleRunner, RunRegistry,
    RunStatus,
};
use serde_json::{Value, json};

use crate::server::modrun_on;
use crate::support::{require_or_skip, test_host_config, wait_for_end, wait_for_status};

/// The example guests' module ids.
const GUESTS: [&str; 2] = ["hello_py", "hello_js"];

/// The example guests, built, and the compiled cache that holds them.
struct Guests {
    components: PathBuf,
    cache: PathBuf,
}

/// Whether this machine has what guest builds need: Python 3 and npm.
fn has_guest_toolchains() -> bool {
    ["python3", "npm"].iter().all(|program| {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success())
    })
}

/// Builds the example guests once per test binary, in a copy kept in the
/// target directory (so that later test runs reuse their toolchains and
/// builds), and compiles each into the shared cache. `None` (skipped, and a
/// failure in CI) without Python or npm.
fn guests() -> Option<&'static Guests> {
    static GUESTS_BUILT: OnceLock<Option<Guests>> = OnceLock::new();
    let built = GUESTS_BUILT.get_or_init(|| {
        if !has_guest_toolchains() {
            return None;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/polyglot");
        let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("polyglot");
        let sources = scratch.join("sources");
        copy_sources(&root, &sources);
        let components = scratch.join("components");
        let built = modrun::module::build_plugins(&sources, &scratch.join("target"), &components)
            .unwrap_or_else(|e| panic!("{e}"));
        let ids: Vec<&str> = built.iter().map(|plugin| plugin.id.as_str()).collect();
        assert_eq!(ids, ["hello_js", "hello_py"]);
        let cache = scratch.join("cache");
        let (dir, cache_dir) = (components.clone(), cache.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let host = ModuleHost::new(HostConfig {
                    cache_dir: Some(cache_dir),
                    ..test_host_config()
                })
                .unwrap();
                let report = host.load_dir(&dir).await.unwrap();
                assert!(report.failed.is_empty(), "{:?}", report.failed);
            });
        })
        .join()
        .unwrap();
        Some(Guests { components, cache })
    });
    match built {
        Some(guests) => Some(guests),
        None => require_or_skip("Python 3 and npm, to build Python and JavaScript plugins"),
    }
}

/// Copies the plugin sources of `from` into `to`, file by file, over what is
/// there: installed toolchains and build records in `to` stay.
fn copy_sources(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap().map(Result::unwrap) {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if !["node_modules", ".venv", "target"].contains(&entry.file_name().to_str().unwrap()) {
                std::fs::create_dir_all(&target).unwrap();
                copy_sources(&entry.path(), &target);
            }
        } else if std::fs::read(&target).ok() != Some(std::fs::read(entry.path()).unwrap()) {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A runner over a fresh plugins directory with both guests, whose runs
/// time out after `timeout_secs`; both are loaded from the compiled cache.
async fn guest_runner(timeout_secs: f64) -> Option<(ModuleRunner, tempfile::TempDir)> {
    let guests = guests()?;
    let dir = tempfile::tempdir().unwrap();
    for id in GUESTS {
        let file = format!("{id}.wasm");
        std::fs::copy(guests.components.join(&file), dir.path().join(&file)).unwrap();
        std::fs::write(
            dir.path().join(format!("{id}.toml")),
            format!("[limits]\ntimeout_secs = {timeout_secs}\n"),
        )
        .unwrap();
    }
    let host = ModuleHost::new(HostConfig {
        cache_dir: Some(guests.cache.clone()),
        ..test_host_config()
    })
    .unwrap();
    let report = host.load_dir(dir.path()).await.unwrap();
    assert_eq!(
        report.loaded,
        ["hello_js", "hello_py"],
        "{:?}",
        report.failed
    );
    assert_eq!(host.compile_stats().compiled, 0, "compiled again");
    let manager = BackgroundTaskManager::new(RunRegistry::in_memory());
    Some((ModuleRunner::new(host, manager), dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_plugins_give_output_log_and_progress() {
    let Some((runner, _dir)) = guest_runner(60.0).await else {
        return;
    };
    for id in GUESTS {
        let run_id = runner
            .start(id, json!({"name": "Ada", "times": 2}))
            .await
            .unwrap();
        let run = wait_for_end(runner.registry(), &run_id).await;
        assert_eq!(run.status, RunStatus::Completed, "{id}: {run:?}");
        assert_eq!(
            run.output,
            Some(json!({"greeting": "Hello, Ada! Hello, Ada!"}))
        );
        let progress = run.progress.expect("progress");
        assert_eq!(
            (progress.fraction, progress.message.as_str()),
            (1.0, "2 of 2")
        );
        let lines: Vec<(LogSource, LogLevel, &str)> = run
            .log
            .iter()
            .map(|entry| (entry.source, entry.level, entry.message.as_str()))
            .collect();
        assert!(
            lines.contains(&(LogSource::Log, LogLevel::Info, "greeting Ada")),
            "{id}: {lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|(source, _, text)| *source == LogSource::Stdout
                    && *text == "said hello 2 time(s)"),
            "{id}: {lines:?}"
        );

        // An error the plugin means is its message, as it wrote it.
        let run_id = runner.start(id, json!({"name": " "})).await.unwrap();
        let run = wait_for_end(runner.registry(), &run_id).await;
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(run.error_message.as_deref(), Some("name must not be blank"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncaught_exception_fails_the_run_with_its_type_message_and_trace() {
    let Some((runner, _dir)) = guest_runner(60.0).await else {
        return;
    };
    for (id, error, trace) in [
        (
            "hello_py",
            "ValueError: the ledger has no entry 'ab'",
            // The traceback names the function that raised.
            "in check_ledger",
        ),
        (
            "hello_js",
            "TypeError: the ledger has no entry \"ab\"",
            // The stack names the function that threw, and its place.
            "checkLedger@app.js:",
        ),
    ] {
        let run_id = runner.start(id, json!({"fail": "ab"})).await.unwrap();
        let run = wait_for_end(runner.registry(), &run_id).await;
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(run.error_message.as_deref(), Some(error), "{id}");
        assert_eq!(run.exit_code, Some(EXIT_FAILURE));
        let log: Vec<String> = run
            .log
            .iter()
            .filter(|entry| entry.level >= LogLevel::Warn || entry.source == LogSource::Stderr)
            .map(|entry| entry.message.clone())
            .collect();
        let log = log.join("\n");
        assert!(
            log.contains(trace),
            "{id}: the trace is not in the log:\n{log}"
        );
        assert!(
            log.contains(error),
            "{id}: the error is not in the log:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_guest_times_out() {
    let Some((runner, _dir)) = guest_runner(0.5).await else {
        return;
    };
    for id in GUESTS {
        let run_id = runner.start(id, json!({"spin": true})).await.unwrap();
        let run = wait_for_end(runner.registry(), &run_id).await;
        assert_eq!(run.status, RunStatus::Failed, "{id}");
        assert_eq!(run.error_message.as_deref(), Some("timed out after 0.5s"));
        assert_eq!(run.exit_code, Some(EXIT_TIMEOUT));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_guest_is_cancelled() {
    let Some((runner, _dir)) = guest_runner(120.0).await else {
        return;
    };
    for id in GUESTS {
        let run_id = runner.start(id, json!({"spin": true})).await.unwrap();
        wait_for_status(runner.registry(), &run_id, RunStatus::Running).await;
        assert!(runner.cancel(&run_id).await.unwrap());
        let run = wait_for_end(runner.registry(), &run_id).await;
        assert_eq!(run.status, RunStatus::Cancelled, "{id}");
    }
}

/// `modrun new NAME --lang LANG`, then `modrun run` with no edits: the run
/// builds the new plugin (installing its toolchain), and it greets.
fn new_plugin_builds_and_runs(lang: &str) {
    if lang != "rust" && guests().is_none() {
        return;
    }
    let project = tempfile::tempdir().unwrap();
    let plugins = project.path().join("plugins");
    let db = project.path().join("data/registry.db");
    let name = format!("greet-{lang}");
    let id = name.replace('-', "_");
    let created = modrun_on(&plugins, &db, &["new", &name, "--lang", lang]);
    assert!(created.status.success(), "{created:?}");
    let listed = modrun_on(&plugins, &db, &["modules"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&format!("not built: {}", plugins.join(&name).display())),
        "{listed}"
    );

    let ran = modrun_on(&plugins, &db, &["run", &id, "name=Ada", "times=2"]);
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert_eq!(ran.status.code(), Some(0), "{stderr}");
    let output: Value = serde_json::from_slice(&ran.stdout).unwrap();
    assert_eq!(output, json!({"greeting": "Hello, Ada! Hello, Ada!"}));
    assert!(stderr.contains("[info] greeting Ada 2 time(s)"), "{stderr}");
    assert!(stderr.contains("2 of 2"), "{stderr}");

    // Built now: a second run builds nothing, and an error reads well.
    let again = modrun_on(&plugins, &db, &["run", &id, "name= "]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("building"), "{stderr}");
    assert!(stderr.contains("name must not be blank"), "{stderr}");

    let rebuilt = modrun_on(&plugins, &db, &["build"]);
    let stdout = String::from_utf8_lossy(&rebuilt.stdout);
    assert!(rebuilt.status.success(), "{rebuilt:?}");
    assert!(
        stdout.contains(&format!("{id} ")) && stdout.contains("unchanged"),
        "{stdout}"
    );
}

#[test]
fn modrun_new_rust_builds_and_runs_with_no_edits() {
    new_plugin_builds_and_runs("rust");
}

#[test]
fn modrun_new_python_builds_and_runs_with_no_edits() {
    new_plugin_builds_and_runs("python");
}

#[test]
fn modrun_new_js_builds_and_runs_with_no_edits() {
    new_plugin_builds_and_runs("js");
}

#[test]
fn modrun_new_refuses_a_bad_name_an_existing_folder_and_an_unknown_language() {
    let project = tempfile::tempdir().unwrap();
    let plugins = project.path().join("plugins");
    let db = project.path().join("data/registry.db");
    let new = |args: &[&str]| {
        let out = modrun_on(&plugins, &db, &[&["new"], args].concat());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = new(&["Bad Name"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot name a plugin"), "{stderr}");
    assert_eq!(new(&["fine"]).0, Some(0));
    let (code, stderr) = new(&["fine", "--lang", "python"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("already exists"), "{stderr}");
    let (code, stderr) = new(&["other", "--lang", "cobol"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("not a plugin language: rust, python or js"),
        "{stderr}"
    );
}

#[test]
fn a_missing_guest_toolchain_is_named_with_the_command_that_fixes_it() {
    let project = tempfile::tempdir().unwrap();
    let plugins = project.path().join("plugins");
    for (name, lang) in [("needs-py", "python"), ("needs-js", "js")] {
        modrun::module::new_plugin(&plugins, name, lang.parse().unwrap()).unwrap();
    }
    // No python3 and no npm on the PATH.
    let out = Command::new(env!("CARGO_BIN_EXE_modrun"))
        .args(["build", "--plugins"])
        .arg(&plugins)
        .env("PATH", project.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("needs_py (python): python3 was not found")
            && stderr.contains("apt-get install python3 python3-venv"),
        "{stderr}"
    );
    assert!(
        stderr.contains("needs_js (js): npm was not found")
            && stderr.contains("apt-get install nodejs npm"),
        "{stderr}"
    );
}
