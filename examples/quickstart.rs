//! The task-management guide's Quick Start, in Rust: a registry, a manager,
//! a few background tasks (one succeeds, one fails, one is cancelled), their
//! statuses and histories.
//!
//! Run it with `cargo run --release --example quickstart`; the runs are kept
//! in `.modrun/registry.db`, so `cargo run -- runs` lists them afterwards.

use std::time::Duration;

use modrun::{BackgroundTaskManager, Run, RunRegistry, RunStatus, TaskLimits};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let registry = RunRegistry::open_sqlite(".modrun/registry.db")?;
    let limits = TaskLimits {
        max_concurrent: Some(4),
        max_queued: Some(100),
    };
    let manager = BackgroundTaskManager::with_limits(registry.clone(), limits);

    // Fire and forget: each start returns the run id at once.
    let greet = Run::new("greeter", "Greeter").with_parameters(json!({"name": "Ada"}));
    let greet_id = manager
        .start_task(greet, async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            anyhow::Ok(json!({"greeting": "Hello, Ada"}))
        })
        .await?;
    let broken_id = manager
        .start_task(Run::new("broken", "Broken"), async {
            anyhow::Result::<()>::Err(anyhow::anyhow!("the input file is empty"))
        })
        .await?;
    let endless_id = manager
        .start_task(Run::new("endless", "Endless"), async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            #[allow(unreachable_code)]
            ()
        })
        .await?;
    println!("started {} tasks", manager.active_task_count());

    // Watch until the quick ones are done, then cancel the endless one.
    while manager.is_task_active(&greet_id) || manager.is_task_active(&broken_id) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    manager.cancel_task(&endless_id).await?;
    manager.wait_all().await;

    for run_id in [&greet_id, &broken_id, &endless_id] {
        let run = registry.get_run(run_id).await?.expect("recorded");
        println!("\n{} ({}): {}", run.module_name, run.run_id, run.status);
        match run.status {
            RunStatus::Completed => println!("  output: {}", run.output.unwrap_or_default()),
            _ => println!("  error: {}", run.error_message.unwrap_or_default()),
        }
        for change in registry.history(run_id).await? {
            println!("  {}  {}", change.at.format("%H:%M:%S%.3f"), change.status);
        }
    }
    manager.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}
