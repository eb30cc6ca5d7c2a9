use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use modrun::registry::{SqliteOptions, SqliteReader, SqliteStore};
use modrun::{Error, Run, RunRegistry, RunStatus, Transition};
use serde_json::json;

use crate::support::statuses;

fn open(path: &Path) -> RunRegistry {
    RunRegistry::open_sqlite(path).expect("open registry")
}

fn open_error(path: &Path) -> String {
    match SqliteStore::open(path, SqliteOptions::default()) {
        Ok(_) => panic!("{} opened, but it should have been refused", path.display()),
        Err(e) => {
            assert!(matches!(e, Error::Database { .. }), "{e:?}");
            e.to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_registry_has_the_same_runs_and_histories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let (finished, waiting) = {
        let registry = open(&path);
        let finished = Run::new("hello", "Hello").with_parameters(json!({"name": "Ada"}));
        registry.add_run(&finished).await.unwrap();
        registry
            .transition(&Transition::running(&finished.run_id))
            .await
            .unwrap();
        registry
            .transition(&Transition::completed(
                &finished.run_id,
                json!({"greeting": "Hi Ada"}),
            ))
            .await
            .unwrap();
        let waiting = Run::new("hello", "Hello");
        registry.add_run(&waiting).await.unwrap();
        registry
            .transition(&Transition::cancelled(&waiting.run_id, "cancelled by user"))
            .await
            .unwrap();
        let finished_run = registry.get_run(&finished.run_id).await.unwrap().unwrap();
        let history = registry.history(&finished.run_id).await.unwrap();
        (
            (finished_run, history),
            registry.get_run(&waiting.run_id).await.unwrap().unwrap(),
        )
    };

    let registry = open(&path);
    assert_eq!(
        registry.get_run(&finished.0.run_id).await.unwrap(),
        Some(finished.0.clone())
    );
    assert_eq!(
        registry.history(&finished.0.run_id).await.unwrap(),
        finished.1
    );
    assert_eq!(
        registry.get_run(&waiting.run_id).await.unwrap(),
        Some(waiting.clone())
    );
    assert_eq!(
        statuses(&registry, &waiting.run_id).await,
        [RunStatus::Queued, RunStatus::Cancelled]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_left_unfinished_are_marked_interrupted_on_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let (queued, running, completed) = (Run::new("a", "A"), Run::new("b", "B"), Run::new("c", "C"));
    {
        let registry = open(&path);
        for run in [&queued, &running, &completed] {
            registry.add_run(run).await.unwrap();
        }
        registry
            .transition(&Transition::running(&running.run_id))
            .await
            .unwrap();
        registry
            .transition(&Transition::completed(&completed.run_id, json!(7)))
            .await
            .unwrap();
        // Dropped with two runs unfinished: what a crashed process leaves.
    }

    let registry = open(&path);
    for (run, before) in [
        (&queued, vec![RunStatus::Queued]),
        (&running, vec![RunStatus::Queued, RunStatus::Running]),
    ] {
        let stored = registry.get_run(&run.run_id).await.unwrap().unwrap();
        assert_eq!(stored.status, RunStatus::Failed);
        assert!(
            stored
                .error_message
                .as_deref()
                .unwrap()
                .starts_with("interrupted")
        );
        assert!(stored.completed_at.is_some());
        let history = registry.history(&run.run_id).await.unwrap();
        let mut expected = before;
        expected.push(RunStatus::Failed);
        assert_eq!(
            history.iter().map(|c| c.status).collect::<Vec<_>>(),
            expected
        );
        assert!(
            history
                .last()
                .unwrap()
                .message
                .as_deref()
                .unwrap()
                .starts_with("interrupted")
        );
    }
    let untouched = registry.get_run(&completed.run_id).await.unwrap().unwrap();
    assert_eq!(untouched.status, RunStatus::Completed);
    assert_eq!(untouched.output, Some(json!(7)));
}

#[test]
fn a_file_that_is_not_a_database_is_refused_not_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let garbage = b"this is not a database, it is a shopping list\n".repeat(200);
    std::fs::write(&path, &garbage).unwrap();
    let message = open_error(&path);
    assert!(message.contains("not a SQLite database"), "{message}");
    assert!(message.contains("registry.db"), "{message}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        garbage,
        "the file was changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    {
        let registry = open(&path);
        for _ in 0..200 {
            registry.add_run(&Run::new("a", "A")).await.unwrap();
        }
    }
    // Overwrite everything after the header page with noise.
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8192, "the database should span several pages");
    for (index, byte) in bytes.iter_mut().enumerate().skip(100) {
        *byte = (index * 7919 % 251) as u8;
    }
    std::fs::write(&path, &bytes).unwrap();
    let message = open_error(&path);
    assert!(
        message.contains("damaged")
            || message.contains("not a SQLite database")
            || message.contains("malformed"),
        "{message}"
    );
}

#[test]
fn a_path_that_cannot_hold_a_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let message = open_error(dir.path());
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );

    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let message = open_error(&file.join("registry.db"));
    assert!(message.contains("directory"), "{message}");
}

#[tokio::test]
async fn a_registry_in_use_by_another_process_is_refused_but_can_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let first = RunRegistry::new(SqliteStore::open(&path, SqliteOptions::default()).unwrap());
    let error = SqliteStore::open(&path, SqliteOptions::default()).unwrap_err();
    assert!(matches!(error, Error::RegistryInUse { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("in use by another modrun process"),
        "{error}"
    );

    // Meanwhile it can be read, and the reader sees each commit.
    let reader = SqliteReader::open(&path).unwrap();
    let run = Run::new("hello", "Hello");
    first.add_run(&run).await.unwrap();
    assert_eq!(
        reader.get(&run.run_id).unwrap().unwrap().status,
        RunStatus::Queued
    );
    first
        .transition(&Transition::running(&run.run_id))
        .await
        .unwrap();
    let history: Vec<RunStatus> = reader
        .history(&run.run_id)
        .unwrap()
        .iter()
        .map(|change| change.status)
        .collect();
    assert_eq!(history, [RunStatus::Queued, RunStatus::Running]);
    assert_eq!(reader.list(&modrun::RunFilter::default()).unwrap().len(), 1);
}

#[test]
fn a_reader_refuses_what_is_not_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let empty = dir.path().join("empty.db");
    rusqlite::Connection::open(&empty)
        .unwrap()
        .execute_batch("CREATE TABLE other (x)")
        .unwrap();
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    for (path, words) in [
        (&missing, "no such file"),
        (&empty, "not a modrun run registry"),
        (&garbage, "not a SQLite database"),
    ] {
        let error = SqliteReader::open(path).unwrap_err();
        assert!(matches!(error, Error::Database { .. }), "{error:?}");
        assert!(error.to_string().contains(words), "{error}");
    }
    assert!(!missing.exists(), "reading never creates a file");
}

#[test]
fn a_database_from_a_newer_modrun_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    drop(SqliteStore::open(&path, SqliteOptions::default()).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);
    let message = open_error(&path);
    assert!(message.contains("schema version is 999"), "{message}");
}

/// SQLite checks each partial index's condition on every write of a row
/// it may hold, and checks a list of three or more values (`status IN
/// (...)`) by building a temporary table each time: a run's writes would
/// pay for it. None of the conditions of the runs table may need one.
#[test]
fn writing_a_run_builds_no_temporary_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    drop(SqliteStore::open(&path, SqliteOptions::default()).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let partial: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs' \
             AND sql LIKE '% WHERE %'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert!(partial >= 3, "the runs table has its partial indexes");
    for write in [
        "INSERT INTO runs (run_id, module_id, module_name, status, created_at, parameters, \
         history_len) VALUES ('r', 'm', 'M', 'running', 1, '{}', 1)",
        "UPDATE runs SET status = 'completed', completed_at = 2 WHERE id = 1",
        "UPDATE runs SET status = 'queued', claimable = 1 WHERE id = 1",
        "DELETE FROM runs WHERE id = 1",
    ] {
        let mut explain = conn.prepare(&format!("EXPLAIN {write}")).unwrap();
        let opcodes: Vec<String> = explain
            .query_map([], |row| row.get(1))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !opcodes.iter().any(|op| op == "OpenEphemeral"),
            "{write} builds a temporary table"
        );
    }
}

/// Records `count` runs, each added and then cancelled: two commits each.
async fn add_ended_runs(registry: &RunRegistry, count: usize) {
    for _ in 0..count {
        let run = Run::new("hello", "Hello");
        registry.add_run(&run).await.unwrap();
        registry
            .transition(&Transition::cancelled(&run.run_id, "not needed"))
            .await
            .unwrap();
    }
}

/// The size of the registry's log file, in bytes.
fn log_size(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("registry.db-wal"))
        .unwrap()
        .len()
}

/// Under writes that never pause, no checkpoint beside the writer can copy
/// the whole log between two commits, and only then does the log start
/// over: the writer sees to it, so the log file stays bounded (about 12 MiB
/// of pages, cut back to 16 MiB) instead of growing by every page of every
/// commit until the load stops or the disk is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_stays_bounded_under_writes_that_never_pause() {
    let dir = tempfile::tempdir().unwrap();
    let registry = open(&dir.path().join("registry.db"));
    // Each commit appends at least the four pages a run and its history
    // touch: 4,000 of them append over 64 MiB of pages. One caller at a
    // time commits its own writes; then, from 16 callers at once, the
    // writer thread commits them.
    let mut largest = 0;
    for _ in 0..20 {
        add_ended_runs(&registry, 100).await;
        largest = largest.max(log_size(dir.path()));
    }
    for _ in 0..5 {
        let callers: Vec<_> = (0..16)
            .map(|_| {
                let registry = registry.clone();
                tokio::spawn(async move { add_ended_runs(&registry, 25).await })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap();
        }
        largest = largest.max(log_size(dir.path()));
    }
    assert!(
        largest <= 16 << 20,
        "the log file grew to {} MiB",
        largest >> 20
    );
    let ended = registry.runs_by_status(RunStatus::Cancelled).await.unwrap();
    assert_eq!(ended.len(), 4_000);
}

/// A reader still reading an older state of the file (a long query,
/// another process) keeps the log from starting over, however it is
/// checkpointed: the log grows meanwhile, writes go on, and once the
/// reader is done the log starts over and its file is cut back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_starts_over_once_a_long_reader_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = open(&path);
    let reader = rusqlite::Connection::open(&path).unwrap();
    let count = |reader: &rusqlite::Connection| -> i64 {
        reader
            .query_row("SELECT count(*) FROM runs", [], |row| row.get(0))
            .unwrap()
    };
    reader.execute_batch("BEGIN").unwrap();
    let seen = count(&reader);
    add_ended_runs(&registry, 1_000).await;
    let held = log_size(dir.path());
    assert!(held > 16 << 20, "the log grew to {} MiB only", held >> 20);
    assert_eq!(
        count(&reader),
        seen,
        "the reader reads the state it began with"
    );

    reader.execute_batch("COMMIT").unwrap();
    add_ended_runs(&registry, 300).await;
    let after = log_size(dir.path());
    assert!(
        after <= 16 << 20,
        "the log file is still {} MiB",
        after >> 20
    );
    let ended = registry.runs_by_status(RunStatus::Cancelled).await.unwrap();
    assert_eq!(ended.len(), 1_300);
}

/// The environment variable that makes [`crash_child`] do its work.
const CRASH_CHILD: &str = "MODRUN_TEST_CRASH_DB";

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sqlite::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The child prints a line per acknowledged write; kill it in the middle of the stream.
    let mut acknowledged = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(record) = line.strip_prefix("ack ") {
            acknowledged.push(record.to_owned());
            if acknowledged.len() == 3_000 {
                child.kill().unwrap();
                break;
            }
        }
    }
    child.wait().unwrap();
    assert_eq!(acknowledged.len(), 3_000, "the child stopped early");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let registry = open(&path);
        for record in &acknowledged {
            let (run_id, status) = record.split_once(' ').unwrap();
            let run = registry.get_run(run_id).await.unwrap();
            let run = run.unwrap_or_else(|| panic!("acknowledged run {run_id} was lost"));
            match status {
                // A run reported completed stays completed.
                "completed" => assert_eq!(run.status, RunStatus::Completed, "{run_id}"),
                // A run only added was unfinished at the crash: now interrupted (or it
                // completed after, and that was committed too).
                _ => assert!(
                    matches!(run.status, RunStatus::Failed | RunStatus::Completed),
                    "{run_id} is {}",
                    run.status
                ),
            }
        }
    });
}

/// Not a test on its own: the child process of [`acknowledged_writes_survive_sigkill`].
/// It writes runs as fast as it can, printing each acknowledged write, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by acknowledged_writes_survive_sigkill"]
async fn crash_child() {
    let Some(path) = std::env::var_os(CRASH_CHILD) else {
        return;
    };
    let registry = open(Path::new(&path));
    let (acks, mut printed) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        // Standard output is line-buffered: each line leaves as it is printed.
        while let Some(line) = printed.recv().await {
            println!("ack {line}");
        }
    });
    for _ in 0..8 {
        let registry = registry.clone();
        let acks = acks.clone();
        tokio::spawn(async move {
            loop {
                let run = Run::new("crash", "Crash");
                registry.add_run(&run).await.unwrap();
                acks.send(format!("{} queued", run.run_id)).unwrap();
                registry
                    .transition(&Transition::running(&run.run_id))
                    .await
                    .unwrap();
                registry
                    .transition(&Transition::completed(&run.run_id, json!(null)))
                    .await
                    .unwrap();
                acks.send(format!("{} completed", run.run_id)).unwrap();
            }
        });
    }
    // Write until killed.
    std::future::pending::<()>().await;
}
