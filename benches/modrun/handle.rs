//! The run handle's path: start a hello run and await its handle, one at a
//! time, against the way before handles, a start and a loop over the
//! event stream until the run's end.

use std::time::Instant;

use modrun::{BackgroundTaskManager, ModuleHost, ModuleRunner, RunEvent, RunRegistry};

use super::{Row, bench_plugins};

pub(super) async fn handle_figures(quick: bool, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let plugins = bench_plugins()?;
    let dir = tempfile::tempdir()?;
    std::fs::copy(plugins.join("hello.wasm"), dir.path().join("hello.wasm"))?;
    let host = ModuleHost::new(modrun::HostConfig::default())?;
    host.load_dir(dir.path()).await?;
    let runner = ModuleRunner::new(host, BackgroundTaskManager::new(RunRegistry::in_memory()));
    let parameters = serde_json::json!({"name": "Ada"});
    let count = if quick { 1_000 } else { 20_000 };

    // Both ways measured warm: the first runs pay for the instance pool's
    // first slots and the allocator's first pages.
    for _ in 0..count / 10 {
        runner
            .start("hello", parameters.clone())
            .await?
            .wait()
            .await?;
    }
    let mut events = runner.registry().subscribe();
    let begin = Instant::now();
    for _ in 0..count {
        let run_id = runner.start("hello", parameters.clone()).await?.into_id();
        loop {
            match events.recv().await? {
                RunEvent::Status {
                    run_id: id, change, ..
                } if id == run_id && change.status.is_terminal() => {
                    break;
                }
                _ => {}
            }
        }
    }
    let event_loop = count as f64 / begin.elapsed().as_secs_f64();
    drop(events);

    let begin = Instant::now();
    for _ in 0..count {
        let run = runner
            .start("hello", parameters.clone())
            .await?
            .wait()
            .await?;
        anyhow::ensure!(run.status.is_terminal());
    }
    let handle = count as f64 / begin.elapsed().as_secs_f64();
    rows.push(Row::measured(
        "hello run awaited through its handle, runs/s",
        handle,
        event_loop,
        0,
        ">= 1.0 x (baseline: start + event-loop wait)",
    ));
    Ok(())
}
