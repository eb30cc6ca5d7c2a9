//! `GET /metrics`: Prometheus text. Counts are kept from the registry's and
//! the host's event streams, so a scrape never scans the registry.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};

use super::AppState;
use crate::module::{ModuleRunner, ReloadEvent};
use crate::registry::RunEvent;
use crate::run::RunStatus;
use crate::sync::LockUnpoisoned;

/// Upper bounds of the run duration histogram, in seconds.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0];

/// Counters behind `/metrics`. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    entered: HashMap<RunStatus, u64>,
    started: HashMap<String, DateTime<Utc>>,
    duration_buckets: [u64; BUCKETS.len()],
    duration_count: u64,
    duration_sum: f64,
    reloads: u64,
    reload_failures: u64,
}

impl Metrics {
    /// Starts counting what `runner`'s registry and host report.
    #[must_use]
    pub fn watch(runner: &ModuleRunner) -> Metrics {
        let metrics = Metrics::default();
        let mut runs = runner.registry().subscribe();
        let counts = metrics.inner.clone();
        tokio::spawn(async move {
            loop {
                match runs.recv().await {
                    Ok(RunEvent::Status { run_id, change, .. }) => {
                        lock(&counts).count_status(run_id, change.status, change.at);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let mut reloads = runner.host().subscribe();
        let counts = metrics.inner.clone();
        tokio::spawn(async move {
            loop {
                match reloads.recv().await {
                    Ok(ReloadEvent::Loaded { .. }) => lock(&counts).reloads += 1,
                    Ok(ReloadEvent::Failed { .. }) => lock(&counts).reload_failures += 1,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        metrics
    }
}

fn lock(counts: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    counts.lock_unpoisoned()
}

impl Counts {
    fn count_status(&mut self, run_id: String, status: RunStatus, at: DateTime<Utc>) {
        *self.entered.entry(status).or_default() += 1;
        if status == RunStatus::Running {
            self.started.insert(run_id, at);
        } else if status.is_terminal()
            && let Some(started) = self.started.remove(&run_id)
        {
            let seconds = (at - started).as_seconds_f64().max(0.0);
            for (bucket, bound) in self.duration_buckets.iter_mut().zip(BUCKETS) {
                if seconds <= bound {
                    *bucket += 1;
                }
            }
            self.duration_count += 1;
            self.duration_sum += seconds;
        }
    }
}

pub(super) async fn render(State(state): State<AppState>) -> Response {
    // Asked first: nothing is held across the wait.
    let disk_bytes = state.runner.registry().disk_bytes().await;
    let manager = state.runner.manager();
    let counts = lock(&state.metrics.inner);
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# HELP modrun_runs_total Runs that entered each status."
    );
    let _ = writeln!(text, "# TYPE modrun_runs_total counter");
    for status in RunStatus::ALL {
        let count = counts.entered.get(&status).copied().unwrap_or(0);
        let _ = writeln!(text, "modrun_runs_total{{status=\"{status}\"}} {count}");
    }
    let _ = writeln!(text, "# HELP modrun_active_runs Runs queued or running.");
    let _ = writeln!(text, "# TYPE modrun_active_runs gauge");
    let _ = writeln!(text, "modrun_active_runs {}", manager.active_task_count());
    let _ = writeln!(text, "# HELP modrun_queued_runs Runs waiting for a slot.");
    let _ = writeln!(text, "# TYPE modrun_queued_runs gauge");
    let _ = writeln!(text, "modrun_queued_runs {}", manager.queued_task_count());
    let _ = writeln!(
        text,
        "# HELP modrun_run_duration_seconds Time from running to finished."
    );
    let _ = writeln!(text, "# TYPE modrun_run_duration_seconds histogram");
    for (bound, count) in BUCKETS.iter().zip(counts.duration_buckets) {
        let _ = writeln!(
            text,
            "modrun_run_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
        );
    }
    let _ = writeln!(
        text,
        "modrun_run_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        counts.duration_count
    );
    let _ = writeln!(
        text,
        "modrun_run_duration_seconds_sum {}",
        counts.duration_sum
    );
    let _ = writeln!(
        text,
        "modrun_run_duration_seconds_count {}",
        counts.duration_count
    );
    let _ = writeln!(text, "# HELP modrun_reloads_total Module versions loaded.");
    let _ = writeln!(text, "# TYPE modrun_reloads_total counter");
    let _ = writeln!(text, "modrun_reloads_total {}", counts.reloads);
    let _ = writeln!(
        text,
        "# HELP modrun_reload_failures_total Module files that failed to load."
    );
    let _ = writeln!(text, "# TYPE modrun_reload_failures_total counter");
    let _ = writeln!(
        text,
        "modrun_reload_failures_total {}",
        counts.reload_failures
    );
    drop(counts);
    let registry = state.runner.registry();
    let retention = registry.retention_stats();
    let _ = writeln!(
        text,
        "# HELP modrun_runs_removed_total Finished runs removed by cleanups."
    );
    let _ = writeln!(text, "# TYPE modrun_runs_removed_total counter");
    let _ = writeln!(text, "modrun_runs_removed_total {}", retention.removed);
    if let Some(last) = retention.last_cleanup {
        let _ = writeln!(
            text,
            "# HELP modrun_last_cleanup_timestamp_seconds When the last cleanup finished."
        );
        let _ = writeln!(text, "# TYPE modrun_last_cleanup_timestamp_seconds gauge");
        let _ = writeln!(
            text,
            "modrun_last_cleanup_timestamp_seconds {}",
            last.timestamp()
        );
    }
    let compiles = state.runner.host().compile_stats();
    let _ = writeln!(
        text,
        "# HELP modrun_modules_compiled_total Components compiled from WebAssembly."
    );
    let _ = writeln!(text, "# TYPE modrun_modules_compiled_total counter");
    let _ = writeln!(text, "modrun_modules_compiled_total {}", compiles.compiled);
    let _ = writeln!(
        text,
        "# HELP modrun_compile_cache_hits_total Components loaded compiled from the cache."
    );
    let _ = writeln!(text, "# TYPE modrun_compile_cache_hits_total counter");
    let _ = writeln!(
        text,
        "modrun_compile_cache_hits_total {}",
        compiles.cache_hits
    );
    // A registry that cannot say (or be asked now) is left out.
    if let Ok(Some(bytes)) = disk_bytes {
        let _ = writeln!(
            text,
            "# HELP modrun_registry_bytes The registry's size on disk."
        );
        let _ = writeln!(text, "# TYPE modrun_registry_bytes gauge");
        let _ = writeln!(text, "modrun_registry_bytes {bytes}");
    }
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}
