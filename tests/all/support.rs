use std::time::{Duration, Instant};

use modrun::{Run, RunRegistry, RunStatus};

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A registry and whatever keeps its storage alive (a temporary directory).
pub struct TestRegistry {
    pub registry: RunRegistry,
    pub _dir: Option<tempfile::TempDir>,
}

pub fn memory_registry() -> TestRegistry {
    TestRegistry {
        registry: RunRegistry::in_memory(),
        _dir: None,
    }
}

pub fn sqlite_registry() -> TestRegistry {
    let dir = tempfile::tempdir().expect("temporary directory");
    let registry = RunRegistry::open_sqlite(dir.path().join("registry.db")).expect("open registry");
    TestRegistry {
        registry,
        _dir: Some(dir),
    }
}

/// Polls until the run has `status`, failing the test after [`DEADLINE`].
pub async fn wait_for_status(registry: &RunRegistry, run_id: &str, status: RunStatus) -> Run {
    let start = Instant::now();
    loop {
        if let Some(run) = registry.get_run(run_id).await.expect("registry read") {
            if run.status == status {
                return run;
            }
            assert!(
                !run.status.is_terminal(),
                "run {run_id} ended {} while waiting for {status}",
                run.status
            );
        }
        assert!(
            start.elapsed() < DEADLINE,
            "run {run_id} did not become {status} within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls `condition` until it holds, failing the test after [`DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what} did not happen within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The statuses of a run's history, in order.
pub async fn statuses(registry: &RunRegistry, run_id: &str) -> Vec<RunStatus> {
    registry
        .history(run_id)
        .await
        .expect("history")
        .into_iter()
        .map(|change| change.status)
        .collect()
}
