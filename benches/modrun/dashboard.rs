//! The dashboard over a registry of 100,000 runs: the server time of the
//! runs page and of the overview against the JSON listing of a page of
//! runs, and what a first page load transfers.

use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use modrun::{BackgroundTaskManager, ModuleRunner, RunRegistry};
use tower::ServiceExt;

use super::{Row, median, old_runs_copy};

pub(super) async fn dashboard_figures(
    quick: bool,
    dir: &std::path::Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let db = dir.join("dashboard.db");
    old_runs_copy(&db, 100_000)?;
    let host = modrun::ModuleHost::new(modrun::HostConfig::default())?;
    let runner = ModuleRunner::new(
        host,
        BackgroundTaskManager::new(RunRegistry::open_sqlite(&db)?),
    );
    let app = modrun::http::router(modrun::http::AppState::new(runner, None));
    let get = |path: &'static str| {
        let app = app.clone();
        async move {
            let request = Request::get(path)
                .header("host", "127.0.0.1")
                .body(Body::empty())?;
            let response = app.oneshot(request).await?;
            anyhow::ensure!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
            let body = axum::body::to_bytes(response.into_body(), usize::MAX).await?;
            anyhow::Ok(body.len())
        }
    };
    let repeats = if quick { 10 } else { 100 };
    let time = async |path: &'static str| -> anyhow::Result<f64> {
        get(path).await?;
        let mut times = Vec::new();
        for _ in 0..repeats {
            let started = Instant::now();
            get(path).await?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(&mut times))
    };
    let listing = time("/runs?limit=100").await?;
    rows.push(Row::measured(
        "dashboard: runs page, 100k runs, p50 ms",
        time("/ui/runs").await?,
        listing,
        2,
        "<= 50 ms (baseline: GET /runs?limit=100)",
    ));
    rows.push(Row::measured(
        "  dashboard: overview, 100k runs, p50 ms",
        time("/").await?,
        listing,
        2,
        "(reported; same baseline)",
    ));
    let page = get("/ui/runs").await?;
    let assets = get("/ui/assets/app.js").await? + get("/ui/assets/app.css").await?;
    let json = get("/runs?limit=100").await?;
    rows.push(Row::measured(
        "dashboard: first load of the runs page, KB",
        (page + assets) as f64 / 1024.0,
        json as f64 / 1024.0,
        1,
        "<= 200 KB (baseline: the JSON of 100 runs)",
    ));
    Ok(())
}
