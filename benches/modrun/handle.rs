//! The run handle's path: start a hello run and await its handle, one at a
//! time, against the way before handles, a start and a loop over the
//! event stream until the run's end, then a read of the run (what `wait`
//! gives back); and many handles awaited at once.

use std::time::Instant;

use modrun::{BackgroundTaskManager, ModuleHost, ModuleRunner, Run, RunEvent, RunRegistry};

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
    // The two ways take turns, a round each, so that the machine's
    // drift (large on a shared VM) weighs on both alike.
    let rounds = 10;
    let (mut event_loop_time, mut handle_time) = (0.0, 0.0);
    for _ in 0..rounds {
        let mut events = runner.registry().subscribe();
        let begin = Instant::now();
        for _ in 0..count / rounds {
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
            // What `wait` gives back: the run as recorded.
            let run = runner.registry().get_run(&run_id).await?;
            anyhow::ensure!(run.is_some_and(|run| run.status.is_terminal()));
        }
        event_loop_time += begin.elapsed().as_secs_f64();
        drop(events);

        let begin = Instant::now();
        for _ in 0..count / rounds {
            let run = runner
                .start("hello", parameters.clone())
                .await?
                .wait()
                .await?;
            anyhow::ensure!(run.status.is_terminal());
        }
        handle_time += begin.elapsed().as_secs_f64();
    }
    let runs = (count / rounds * rounds) as f64;
    let (event_loop, handle) = (runs / event_loop_time, runs / handle_time);
    rows.push(Row::measured(
        "hello run awaited through its handle, runs/s",
        handle,
        event_loop,
        0,
        ">= 1.0 x (baseline: start + event-loop wait + read of the run)",
    ));
    many_waiting(if quick { 5_000 } else { 20_000 }, rows).await
}

/// `count` tasks, each awaited through its own handle by a task of its
/// own, ending one after another (each lets the next go as it ends):
/// ends per second until every wait has returned, against the same with
/// a tenth as many. A task's end must wake the waits on its run only:
/// were it to wake every wait, each end would cost as much as the waits
/// still waiting, and ten times as many would run ten times slower.
async fn many_waiting(count: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let few = ends_per_second(count / 10).await?;
    let many = ends_per_second(count).await?;
    rows.push(Row::measured(
        &format!("{count} task ends, one after another, each awaited by a handle, ends/s"),
        many,
        few,
        0,
        ">= 0.8 x (baseline: the same with a tenth as many)",
    ));
    Ok(())
}

/// Ends per second of `count` tasks that end one after another, each
/// awaited by a handle: see [`many_waiting`].
async fn ends_per_second(count: usize) -> anyhow::Result<f64> {
    let manager = BackgroundTaskManager::new(RunRegistry::in_memory());
    let (release, mut turn) = tokio::sync::oneshot::channel::<()>();
    let mut waits = Vec::with_capacity(count);
    for _ in 0..count {
        let (next, next_turn) = tokio::sync::oneshot::channel::<()>();
        let mine = std::mem::replace(&mut turn, next_turn);
        let handle = manager
            .start_task(Run::new("task", "Task"), async move {
                let _ = mine.await;
                let _ = next.send(());
            })
            .await?;
        waits.push(tokio::spawn(async move { handle.wait().await }));
    }
    // The waits listen before the first task is let go.
    tokio::task::yield_now().await;
    let begin = Instant::now();
    let _ = release.send(());
    for wait in waits {
        anyhow::ensure!(wait.await??.status.is_terminal());
    }
    Ok(count as f64 / begin.elapsed().as_secs_f64())
}
