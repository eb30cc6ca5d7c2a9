use std::process::Command;

use modrun::{
    BackgroundTaskManager, HostConfig, LogLevel, LogSource, ModuleHost, ModuleRunner, RunRegistry,
    RunStatus,
};
use serde_json::{Value, json};

use crate::modules::runner_with;
use crate::server::Server;
use crate::support::{plugins_dir, test_host_config, wait_for_end};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_exits_gets_an_outcome_that_says_so() {
    let (runner, _dir, _) = runner_with(&["abuse", "trap"], &[]).await;
    let run_id = runner
        .start("abuse", json!({"mode": "exit", "code": 0}))
        .await
        .unwrap();
    let clean = wait_for_end(runner.registry(), &run_id).await;
    assert_eq!(
        clean.status,
        RunStatus::Completed,
        "{:?}",
        clean.error_message
    );
    assert_eq!(
        (clean.exit_code, &clean.output),
        (Some(0), &Some(Value::Null))
    );
    let said: Vec<(LogSource, &str)> = clean
        .log
        .iter()
        .map(|e| (e.source, e.message.as_str()))
        .collect();
    assert!(
        said.contains(&(LogSource::Stdout, "about to exit")),
        "{said:?}"
    );
    assert!(
        said.iter()
            .any(|(source, message)| *source == LogSource::Log
                && message.contains("called exit with status 0 before `run` returned")),
        "{said:?}"
    );

    let run_id = runner
        .start("abuse", json!({"mode": "exit", "code": 42}))
        .await
        .unwrap();
    let failed = wait_for_end(runner.registry(), &run_id).await;
    assert_eq!(failed.status, RunStatus::Failed);
    let message = failed.error_message.unwrap();
    assert!(
        message.starts_with("the module exited with a failure status"),
        "{message}"
    );
    assert!(
        !message.contains("backtrace") && !message.contains('\n'),
        "{message}"
    );
    assert!(failed.log.iter().any(|e| e.message == "about to exit"));

    // A trap's one-line message; its backtrace is in the log.
    let run_id = runner.start("trap", json!({})).await.unwrap();
    let trapped = wait_for_end(runner.registry(), &run_id).await;
    let message = trapped.error_message.unwrap();
    assert!(!message.contains('\n'), "{message}");
    assert!(
        trapped
            .log
            .iter()
            .any(|e| e.level == LogLevel::Error && e.message.contains("wasm backtrace")),
        "{:?}",
        trapped.log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_lose_their_endings_and_output_is_kept_line_by_line() {
    let (runner, _dir, _) = runner_with(&["abuse"], &[]).await;
    let parameters = json!({"mode": "print", "message": "Line with spaces   \n\r", "count": 3});
    let run_id = runner.start("abuse", parameters).await.unwrap();
    let run = wait_for_end(runner.registry(), &run_id).await;
    let said: Vec<(LogSource, &str)> = run
        .log
        .iter()
        .map(|e| (e.source, e.message.as_str()))
        .collect();
    assert_eq!(
        said,
        [
            (LogSource::Log, "Line with spaces   "),
            (LogSource::Stdout, "line 0"),
            (LogSource::Stdout, "line 1"),
            (LogSource::Stdout, "line 2"),
            (LogSource::Stderr, "no newline at the end"),
        ]
    );
    let stdout: Vec<_> = run
        .log
        .iter()
        .filter(|e| e.source == LogSource::Stdout)
        .collect();
    assert!(stdout.windows(2).all(|pair| pair[0].at <= pair[1].at));

    // Ten thousand lines are capped at a thousand entries, the bytes as before.
    let run_id = runner
        .start(
            "abuse",
            json!({"mode": "print", "message": "", "count": 10_000}),
        )
        .await
        .unwrap();
    let run = wait_for_end(runner.registry(), &run_id).await;
    let stdout: Vec<_> = run
        .log
        .iter()
        .filter(|e| e.source == LogSource::Stdout)
        .collect();
    assert_eq!(
        stdout.len(),
        1001,
        "a thousand lines, the rest in one, then the truncation marker"
    );
    assert_eq!(stdout[0].message, "line 0");
    assert!(stdout[1000].message.starts_with("[output truncated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_past_the_engines_instance_pool_wait_queued_instead_of_failing() {
    let dir = plugins_dir(&["countdown"]);
    let host = ModuleHost::new(HostConfig {
        max_instances: 2,
        ..test_host_config()
    })
    .unwrap();
    host.load_dir(dir.path()).await.unwrap();
    let registry = RunRegistry::in_memory();
    // No limits of the manager's own: only the pool bounds the runs.
    let runner = ModuleRunner::new(host, BackgroundTaskManager::new(registry.clone()));
    let mut ids = Vec::new();
    for _ in 0..6 {
        let id = runner
            .start("countdown", json!({"seconds": 2, "step_ms": 50}))
            .await
            .unwrap();
        ids.push(id);
    }
    let statuses = async || {
        let mut counts = (0, 0);
        for id in &ids {
            match registry.get_run(id).await.unwrap().unwrap().status {
                RunStatus::Running => counts.0 += 1,
                RunStatus::Queued => counts.1 += 1,
                _ => {}
            }
        }
        counts
    };
    let (running, queued) = statuses().await;
    assert!(running <= 2, "{running} running with a pool of 2");
    assert!(queued >= 4, "only {queued} waiting");
    for id in &ids {
        let run = wait_for_end(&registry, id).await;
        assert_eq!(run.status, RunStatus::Completed, "{:?}", run.error_message);
    }
}

#[test]
fn serve_refuses_more_concurrent_runs_than_the_instance_pool_holds() {
    let plugins = plugins_dir(&["hello"]);
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_modrun"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--max-concurrent",
            "5000",
            "--plugins",
        ])
        .arg(plugins.path())
        .arg("--db")
        .arg(data.path().join("registry.db"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--max-concurrent 5000 is more than the 1000 runs"),
        "{stderr}"
    );
}

/// `modrun run` with these arguments, on the registry `db`.
fn modrun_run(
    plugins: &std::path::Path,
    db: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    crate::server::modrun_on(plugins, db, &[&["run"], args].concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modrun_run_is_recorded_in_the_registry_unless_in_memory() {
    let plugins = plugins_dir(&["hello"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let done = modrun_run(plugins.path(), &db, &["hello", "name=Ada"]);
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let quiet = modrun_run(plugins.path(), &db, &["hello", "name=Bo", "--in-memory"]);
    assert_eq!(quiet.status.code(), Some(0));

    let registry = RunRegistry::open_sqlite(&db).unwrap();
    let runs = registry.runs_by_module("hello").await.unwrap();
    assert_eq!(runs.len(), 1, "only the recorded run: {runs:?}");
    assert_eq!(runs[0].status, RunStatus::Completed);
    assert_eq!(runs[0].parameters["name"], "Ada");
    assert_eq!(registry.history(&runs[0].run_id).await.unwrap().len(), 3);
}

#[test]
fn modrun_run_goes_through_the_server_that_holds_the_registry() {
    let plugins = plugins_dir(&["hello", "trap"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let server = Server::start(plugins.path(), &db, &[]);
    let done = modrun_run(plugins.path(), &db, &["hello", "name=Ada", "times=2"]);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(0), "{stderr}");
    let output: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(output, json!({"greeting": "Hello, Ada! Hello, Ada!"}));
    assert!(stderr.contains("[info] greeting Ada"), "{stderr}");
    assert!(stderr.contains("said hello 2 time(s)"), "{stderr}");

    let (_, listed) = server.get("/runs?module=hello");
    let runs = listed["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["status"], "completed");

    for (args, code, words) in [
        (&["trap"][..], 1, "the module trapped"),
        (&["hello", "name=5"][..], 2, "is not of type"),
        (&["nope"][..], 2, "no module"),
    ] {
        let result = modrun_run(plugins.path(), &db, args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
    }
    assert_eq!(server.terminate(), 0);
}
