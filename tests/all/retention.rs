use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::Utc;
use modrun::{LogEntry, LogLevel, LogSource, Run, RunRegistry, Transition};
use serde_json::json;

use crate::server::Server;
use crate::support::{DEADLINE, plugins_dir};

/// Fills a registry file with `old` runs that ended 40 days ago (each with
/// a kilobyte of log) and `recent` that ended now; returns the recent ids.
async fn fill(db: &Path, old: usize, recent: usize) -> Vec<String> {
    let registry = RunRegistry::open_sqlite(db).unwrap();
    let long_ago = Utc::now() - chrono::Duration::days(40);
    let mut recent_ids = Vec::new();
    let mut writes = Vec::new();
    for index in 0..old + recent {
        let registry = registry.clone();
        let run = Run::new("hello", "Hello");
        if index >= old {
            recent_ids.push(run.run_id.clone());
        }
        writes.push(tokio::spawn(async move {
            registry.add_run(&run).await.unwrap();
            let mut end = Transition::completed(&run.run_id, json!({"n": index}));
            end.log = Some(vec![LogEntry {
                at: Utc::now(),
                level: LogLevel::Info,
                source: LogSource::Log,
                message: "x".repeat(1024),
            }]);
            if index < old {
                end.at = long_ago;
            }
            assert!(registry.transition(&end).await.unwrap());
        }));
    }
    for write in writes {
        write.await.unwrap();
    }
    registry.flush().await.unwrap();
    recent_ids
}

/// The registry file's size once its write-ahead log is copied in (no
/// modrun holds the file).
fn size_on_disk(db: &Path) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(conn);
    std::fs::metadata(db).unwrap().len()
}

fn cleanup_command(db: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_modrun"))
        .arg("cleanup")
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_removes_runs_past_their_retention_and_the_file_shrinks() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let recent = fill(&db, 3000, 10).await;
    let before = size_on_disk(&db);
    assert!(before > 3_000_000, "the filled file is {before} bytes");

    let plugins = plugins_dir(&["hello"]);
    let server = Server::start(plugins.path(), &db, &["--retain", "30d"]);
    let start = Instant::now();
    // The count grows batch by batch; the time is set once the cleanup ends.
    while server.metric("modrun_runs_removed_total") != Some(3000.0)
        || server
            .metric("modrun_last_cleanup_timestamp_seconds")
            .is_none()
    {
        assert!(start.elapsed() < DEADLINE, "the old runs were not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        server
            .metric("modrun_registry_bytes")
            .is_some_and(|bytes| bytes > 0.0)
    );
    let (_, listing) = server.get("/runs?limit=10000");
    let mut listed: Vec<&str> = listing["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["run_id"].as_str().unwrap())
        .collect();
    listed.sort_unstable();
    let mut kept: Vec<&str> = recent.iter().map(String::as_str).collect();
    kept.sort_unstable();
    assert_eq!(listed, kept, "exactly the runs within the retention stay");
    assert_eq!(server.terminate(), 0);

    // The space went back to the filesystem.
    let after = size_on_disk(&db);
    assert!(
        after < before / 4,
        "the file went from {before} to {after} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modrun_cleanup_counts_with_dry_run_then_removes_directly_or_through_the_server() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    fill(&db, 30, 5).await;

    let (ok, out, err) = cleanup_command(&db, &["--older-than", "30d", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("would remove 30 finished run(s)"), "{out}");
    let registry = RunRegistry::open_sqlite(&db).unwrap();
    assert_eq!(registry.recent_runs(100).await.unwrap().len(), 35);
    drop(registry);

    let (ok, out, err) = cleanup_command(&db, &["--older-than", "30d", "--status", "failed"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("removed 0 finished run(s)"), "{out}");
    let (ok, _, err) = cleanup_command(&db, &["--older-than", "30d", "--status", "running"]);
    assert!(!ok);
    assert!(err.contains("active and never removed"), "{err}");
    let (ok, _, err) = cleanup_command(&db, &["--older-than", "soon"]);
    assert!(!ok);
    assert!(err.contains("not a duration"), "{err}");

    // Through the server that holds the file.
    let plugins = plugins_dir(&["hello"]);
    let server = Server::start(plugins.path(), &db, &["--retain", "never"]);
    let (ok, out, err) = cleanup_command(&db, &["--older-than", "30d", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("would remove 30"), "{out}");
    let (ok, out, err) = cleanup_command(&db, &["--older-than", "30d", "--module", "hello"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("removed 30"), "{out}");
    let (_, listing) = server.get("/runs?limit=100");
    assert_eq!(listing["runs"].as_array().unwrap().len(), 5);
    let (status, body) = server.post(
        "/cleanup",
        &json!({"older_than": "1d", "statuses": ["queued"]}),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(server.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_of_an_older_modrun_is_rewritten_once_so_cleanups_give_space_back() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    // A file as an older modrun left it: no incremental vacuum.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE placeholder (x); DROP TABLE placeholder;")
            .unwrap();
    }
    let mode = |db: &Path| -> i64 {
        rusqlite::Connection::open(db)
            .unwrap()
            .query_row("PRAGMA auto_vacuum", [], |row| row.get(0))
            .unwrap()
    };
    assert_eq!(mode(&db), 0);
    let registry = RunRegistry::open_sqlite(&db).unwrap();
    let run = Run::new("hello", "Hello");
    registry.add_run(&run).await.unwrap();
    drop(registry);
    assert_eq!(mode(&db), 2, "incremental");
    let registry = RunRegistry::open_sqlite(&db).unwrap();
    assert!(registry.get_run(&run.run_id).await.unwrap().is_some());
}
