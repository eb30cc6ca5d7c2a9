use std::path::{Path, PathBuf};
use std::time::Duration;

use modrun::{BackgroundTaskManager, Error, Run, RunRegistry, RunStatus};
use tokio::sync::oneshot;

use crate::support::{require_or_skip, statuses, wait_for_status, wait_until};

/// A task that runs until told to finish, then returns `output`.
async fn start_waiting(
    manager: &BackgroundTaskManager,
    output: String,
) -> (String, oneshot::Sender<()>) {
    let (finish, finished) = oneshot::channel::<()>();
    let run_id = manager
        .start_task(Run::new("waiter", "Waiter"), async move {
            let _ = finished.await;
            anyhow::Ok(output)
        })
        .await
        .expect("the registry is writable at first");
    wait_for_status(manager.registry(), &run_id, RunStatus::Running).await;
    (run_id.into_id(), finish)
}

/// Waits until the registry says it cannot write, and returns why.
async fn wait_unavailable(registry: &RunRegistry) -> String {
    wait_until("the registry reports itself unavailable", || {
        registry.health().unavailable.is_some() && registry.health().held_writes > 0
    })
    .await;
    registry.health().unavailable.expect("checked above")
}

/// What a refused start says.
async fn refused_start(manager: &BackgroundTaskManager) -> String {
    match manager.start_task(Run::new("late", "Late"), async {}).await {
        Err(Error::RegistryUnavailable { reason }) => reason,
        other => panic!("a start while the registry cannot write was not refused: {other:?}"),
    }
}

/// What the registry tells while it holds a finished run: it is still
/// running everywhere anyone can look, and a cancel is refused, not lost.
async fn assert_held_as_running(manager: &BackgroundTaskManager, run_id: &str) {
    let registry = manager.registry();
    let stored = registry.get_run(run_id).await.unwrap().unwrap();
    assert_eq!(
        stored.status,
        RunStatus::Running,
        "reported finished before it was stored"
    );
    assert!(manager.is_task_active(run_id));
    assert!(matches!(
        manager.cancel_task(run_id).await,
        Err(Error::RegistryUnavailable { .. })
    ));
}

/// Once the registry can write again: the held end is committed, its
/// history intact, and starts work again.
async fn assert_recovered(manager: &BackgroundTaskManager, run_id: &str, output: &str) {
    let registry = manager.registry();
    let finished = wait_for_status(registry, run_id, RunStatus::Completed).await;
    assert_eq!(finished.output, Some(output.into()));
    assert_eq!(
        statuses(registry, run_id).await,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Completed]
    );
    wait_until("the registry reports itself available", || {
        registry.health().unavailable.is_none()
    })
    .await;
    assert_eq!(registry.health().held_writes, 0);
    let next = manager
        .start_task(Run::new("after", "After"), async {})
        .await
        .expect("starts are taken again");
    wait_for_status(registry, &next, RunStatus::Completed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_by_another_process_refuses_starts_and_holds_ends_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = RunRegistry::open_sqlite(&path).unwrap();
    let manager = BackgroundTaskManager::new(registry.clone());
    let (run_id, finish) = start_waiting(&manager, "done".into()).await;

    // Another process (a sqlite3 shell, a backup tool) takes the write lock.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let _ = finish.send(());
    let reason = wait_unavailable(&registry).await;
    assert!(reason.contains("lock"), "{reason}");

    let started = std::time::Instant::now();
    assert!(refused_start(&manager).await.contains("lock"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a start waited {:?} to be refused",
        started.elapsed()
    );
    assert_held_as_running(&manager, &run_id).await;

    other.execute_batch("ROLLBACK").unwrap();
    drop(other);
    assert_recovered(&manager, &run_id, "done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_registry_file_refuses_starts_until_it_is_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = RunRegistry::open_sqlite(&path).unwrap();
    let manager = BackgroundTaskManager::new(registry.clone());
    let (run_id, finish) = start_waiting(&manager, "kept".into()).await;

    // Deleted under the server; a second name for the file lets the test
    // put the very same file back afterwards.
    let aside = dir.path().join("aside.db");
    std::fs::hard_link(&path, &aside).unwrap();
    std::fs::remove_file(&path).unwrap();
    // Noticed with nothing being written, so that health tells at once.
    wait_until("the deletion is noticed", || {
        registry.health().unavailable.is_some()
    })
    .await;
    let _ = finish.send(());
    let reason = wait_unavailable(&registry).await;
    assert!(reason.contains("deleted"), "{reason}");
    assert!(refused_start(&manager).await.contains("deleted"));
    assert_held_as_running(&manager, &run_id).await;

    std::fs::rename(&aside, &path).unwrap();
    assert_recovered(&manager, &run_id, "kept").await;
    drop(manager);
    drop(registry);
    // The end was committed to the file, not to a deleted copy of it.
    let reopened = RunRegistry::open_sqlite(&path).unwrap();
    let run = reopened.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Completed);
}

/// A filesystem of `size` mounted on a temporary directory, unmounted when
/// dropped. Needs root (CI runs as root); elsewhere the test is skipped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "modrun-test"])
            .arg(dir.path())
            .output();
        match mounted {
            Ok(output) if output.status.success() => Some(SmallDisk { dir }),
            Ok(output) => require_or_skip(&format!(
                "a small filesystem (mount tmpfs: {})",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(e) => require_or_skip(&format!("a small filesystem (mount: {e})")),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk with one file; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_starts_and_holds_ends_until_space_returns() {
    let Some(disk) = SmallDisk::mount("4m") else {
        return;
    };
    let path = disk.path().join("registry.db");
    let registry = RunRegistry::open_sqlite(&path).unwrap();
    let manager = BackgroundTaskManager::new(registry.clone());
    // An output larger than the room the log file kept from earlier commits.
    let output = "o".repeat(1 << 20);
    let (run_id, finish) = start_waiting(&manager, output.clone()).await;

    let filler = disk.fill();
    let _ = finish.send(());
    let reason = wait_unavailable(&registry).await;
    assert!(reason.contains("disk is full"), "{reason}");
    assert!(refused_start(&manager).await.contains("disk is full"));
    assert_held_as_running(&manager, &run_id).await;

    std::fs::remove_file(filler).unwrap();
    assert_recovered(&manager, &run_id, &output).await;
    drop(manager);
    drop(registry);
    let reopened = RunRegistry::open_sqlite(&path).unwrap();
    let run = reopened.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.output, Some(output.into()));
}
