use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use modrun::{BackgroundTaskManager, CancelReason, Error, Run, RunRegistry, RunStatus, TaskLimits};
use serde_json::json;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::support::{
    DEADLINE, memory_registry, sqlite_registry, statuses, wait_for_status, wait_until,
};

type AnyResult<T> = anyhow::Result<T>;

/// Runs each test once with the in-memory registry and once with SQLite.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = crate::support::memory_registry();
                    super::$name(backend.registry.clone()).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = crate::support::sqlite_registry();
                    super::$name(backend.registry.clone()).await;
                }
            )*
        }
    };
}

both_backends!(
    a_successful_task_goes_queued_running_completed,
    running_is_recorded_when_the_work_really_starts,
    an_error_fails_the_run_with_its_message,
    the_guides_way_to_reuse_a_run_id_runs_it_again,
    a_run_added_first_is_adopted_and_one_not_added_is_recorded,
    a_panic_fails_the_run_and_the_manager_keeps_working,
    a_task_that_never_awaits_still_completes,
    cancel_stops_a_running_task,
    cancel_of_unknown_or_finished_runs_returns_false,
    cancel_racing_completion_leaves_exactly_one_terminal_state,
    wait_all_returns_even_when_tasks_fail,
    waiting_runs_start_by_priority_then_first_come,
    a_run_not_due_waits_queued_until_its_time,
);

async fn a_successful_task_goes_queued_running_completed(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());
    let run = Run::new("greeter", "Greeter").with_parameters(json!({"name": "Ada"}));
    let (release, released) = oneshot::channel::<()>();
    let run_id = manager
        .start_task(run, async move {
            released.await?;
            AnyResult::Ok(json!({"greeting": "Hello, Ada"}))
        })
        .await
        .unwrap();
    // start_task returned while the work is still waiting.
    assert!(manager.is_task_active(&run_id));
    assert_eq!(manager.active_task_ids(), std::slice::from_ref(&run_id));
    assert_eq!(manager.active_task_count(), 1);
    wait_for_status(&registry, &run_id, RunStatus::Running).await;
    release.send(()).unwrap();
    manager.wait_all().await;

    let run = registry.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(run.output, Some(json!({"greeting": "Hello, Ada"})));
    assert_eq!(run.error_message, None);
    assert!(run.started_at.is_some() && run.completed_at.is_some());
    assert!(run.started_at <= run.completed_at);
    assert_eq!(
        statuses(&registry, &run_id).await,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Completed]
    );
    assert!(!manager.is_task_active(&run_id));
    assert_eq!(manager.active_task_count(), 0);
}

async fn running_is_recorded_when_the_work_really_starts(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());
    let run = Run::new("probe", "Probe");
    let run_id = run.run_id.clone();
    let seen = {
        let registry = registry.clone();
        let run_id = run_id.clone();
        async move {
            let run = registry
                .get_run(&run_id)
                .await?
                .expect("recorded before the work");
            AnyResult::Ok((run.status, run.started_at.is_some()))
        }
    };
    manager.start_task(run, seen).await.unwrap();
    manager.wait_all().await;
    let run = registry.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.output, Some(json!(["running", true])));
}

/// The guide's code: a finished run's id is reused by giving `update_run` a
/// fresh `Queued` run, then `start_task`.
async fn the_guides_way_to_reuse_a_run_id_runs_it_again(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());
    let run = Run::new("report", "Report");
    let run_id = run.run_id.clone();
    manager
        .start_task(run, async { AnyResult::Ok(json!("first")) })
        .await
        .unwrap();
    manager.wait_all().await;

    let mut again = Run::new("report", "Report");
    again.run_id = run_id.clone();
    registry.update_run(&again).await.unwrap();
    manager
        .start_task(again, async { AnyResult::Ok(json!("second")) })
        .await
        .unwrap();
    manager.wait_all().await;
    let run = registry.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.output, Some(json!("second")));
    assert_eq!(
        statuses(&registry, &run_id).await,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Completed]
    );
}

async fn an_error_fails_the_run_with_its_message(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());
    let run_id = manager
        .start_task(Run::new("broken", "Broken"), async {
            let inner = std::io::Error::other("disk unplugged");
            AnyResult::<()>::Err(anyhow::Error::new(inner).context("cannot save the report"))
        })
        .await
        .unwrap();
    manager.wait_all().await;
    let run = registry.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        run.error_message.as_deref(),
        Some("cannot save the report: disk unplugged")
    );
    assert!(run.exit_code.is_some_and(|code| code != 0));
    assert_eq!(run.output, None);
    let history = registry.history(&run_id).await.unwrap();
    assert_eq!(history.last().unwrap().message, run.error_message);
}

async fn a_panic_fails_the_run_and_the_manager_keeps_working(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());
    let run_id = manager
        .start_task(Run::new("panicky", "Panicky"), async {
            tokio::task::yield_now().await;
            if registry_is_sane() {
                panic!("index 7 out of range");
            }
            AnyResult::Ok(())
        })
        .await
        .unwrap();
    manager.wait_all().await;
    let run = registry.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    let message = run.error_message.unwrap();
    assert!(
        message.contains("panicked") && message.contains("index 7 out of range"),
        "{message}"
    );
    assert_eq!(run.exit_code, Some(modrun::run::EXIT_PANIC));
    assert_eq!(manager.active_task_count(), 0);

    let after = manager
        .start_task(Run::new("fine", "Fine"), async { AnyResult::Ok(1) })
        .await
        .unwrap();
    manager.wait_all().await;
    assert_eq!(
        registry.get_run(&after).await.unwrap().unwrap().status,
        RunStatus::Completed
    );
}

/// Keeps the compiler from seeing that the panic above always happens.
fn registry_is_sane() -> bool {
    std::hint::black_box(true)
}

async fn a_task_that_never_awaits_still_completes(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());
    let run_id = manager
        .start_task(Run::new("instant", "Instant"), async {})
        .await
        .unwrap();
    manager.wait_all().await;
    let run = registry.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.output, Some(serde_json::Value::Null));
}

async fn cancel_stops_a_running_task(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());
    let stopped = Arc::new(AtomicBool::new(false));
    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let guard = SetOnDrop(stopped.clone());
    let run_id = manager
        .start_task(Run::new("forever", "Forever"), async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        })
        .await
        .unwrap();
    wait_for_status(&registry, &run_id, RunStatus::Running).await;

    assert!(manager.cancel_task(&run_id).await.unwrap());
    assert!(!manager.is_task_active(&run_id));
    let run = registry.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
    assert_eq!(run.error_message.as_deref(), Some("cancelled by user"));
    tokio::time::timeout(DEADLINE, manager.wait_all())
        .await
        .expect("cancelled work stops");
    assert!(stopped.load(Ordering::SeqCst), "the work was dropped");
    let history = registry.history(&run_id).await.unwrap();
    let seen: Vec<_> = history.iter().map(|c| c.status).collect();
    assert_eq!(
        seen,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Cancelled]
    );
    assert_eq!(history[2].message.as_deref(), Some("cancelled by user"));
    // A second cancel finds nothing to cancel.
    assert!(!manager.cancel_task(&run_id).await.unwrap());
}

async fn cancel_of_unknown_or_finished_runs_returns_false(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());
    assert!(!manager.cancel_task("no-such-run").await.unwrap());
    let run_id = manager
        .start_task(Run::new("quick", "Quick"), async { AnyResult::Ok("done") })
        .await
        .unwrap();
    manager.wait_all().await;
    assert!(!manager.cancel_task(&run_id).await.unwrap());
    let run = registry.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(statuses(&registry, &run_id).await.len(), 3);
}

async fn cancel_racing_completion_leaves_exactly_one_terminal_state(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());
    let (mut cancelled, mut completed) = (0, 0);
    for round in 0..200 {
        let run_id = manager
            .start_task(Run::new("race", "Race"), async move {
                for _ in 0..round % 3 {
                    tokio::task::yield_now().await;
                }
                AnyResult::Ok(round)
            })
            .await
            .unwrap();
        let won = manager.cancel_task(&run_id).await.unwrap();
        manager.wait_all().await;
        let run = registry.get_run(&run_id).await.unwrap().unwrap();
        let history = statuses(&registry, &run_id).await;
        let terminal: Vec<_> = history.iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal.len(), 1, "round {round}: history {history:?}");
        assert_eq!(*terminal[0], run.status);
        if won {
            cancelled += 1;
            assert_eq!(run.status, RunStatus::Cancelled, "round {round}");
        } else {
            completed += 1;
            assert_eq!(run.status, RunStatus::Completed, "round {round}");
            assert_eq!(run.output, Some(json!(round)));
        }
    }
    assert_eq!(cancelled + completed, 200);
}

async fn wait_all_returns_even_when_tasks_fail(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());
    let mut ids = Vec::new();
    for index in 0..30 {
        let run = Run::new("mixed", "Mixed");
        ids.push(
            manager
                .start_task(run, async move {
                    tokio::task::yield_now().await;
                    match index % 3 {
                        0 => AnyResult::Ok(index),
                        1 => Err(anyhow::anyhow!("task {index} failed")),
                        _ => panic!("task {index} panicked"),
                    }
                })
                .await
                .unwrap(),
        );
    }
    tokio::time::timeout(DEADLINE, manager.wait_all())
        .await
        .expect("wait_all returns");
    for (index, run_id) in ids.iter().enumerate() {
        let status = registry.get_run(run_id).await.unwrap().unwrap().status;
        let expected = if index % 3 == 0 {
            RunStatus::Completed
        } else {
            RunStatus::Failed
        };
        assert_eq!(status, expected, "task {index}");
    }
    assert_eq!(manager.active_task_count(), 0);
}

async fn a_run_added_first_is_adopted_and_one_not_added_is_recorded(registry: RunRegistry) {
    let manager = BackgroundTaskManager::new(registry.clone());

    // The guide's way: add the run, then start it.
    let added = Run::new("a", "A").with_parameters(json!({"key": "value"}));
    registry.add_run(&added).await.unwrap();
    let id = manager.start_task(added.clone(), async {}).await.unwrap();
    assert_eq!(id, added.run_id);
    // Without adding first: the manager records it.
    let fresh = Run::new("b", "B");
    let fresh_id = manager.start_task(fresh, async {}).await.unwrap();
    manager.wait_all().await;

    for run_id in [&id, &fresh_id] {
        assert_eq!(
            statuses(&registry, run_id).await,
            [RunStatus::Queued, RunStatus::Running, RunStatus::Completed]
        );
    }
    let run = registry.get_run(&id).await.unwrap().unwrap();
    assert_eq!(run.parameters["key"], "value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_an_active_id_is_refused_and_a_finished_one_is_reused() {
    let backend = sqlite_registry();
    let registry = backend.registry.clone();
    let manager = BackgroundTaskManager::new(registry.clone());
    let run = Run::new("a", "A");
    let (release, released) = oneshot::channel::<()>();
    let run_id = manager
        .start_task(run.clone(), async move {
            released.await?;
            AnyResult::Ok("first")
        })
        .await
        .unwrap();
    wait_for_status(&registry, &run_id, RunStatus::Running).await;

    let refused = manager
        .start_task(run.clone(), async { AnyResult::Ok("second") })
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            Error::RunActive {
                status: RunStatus::Running,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(
        manager.is_task_active(&run_id),
        "the first task is untouched"
    );
    release.send(()).unwrap();
    manager.wait_all().await;
    assert_eq!(
        registry.get_run(&run_id).await.unwrap().unwrap().output,
        Some(json!("first"))
    );

    // Finished: the id may be used again, and the new run replaces the old entry.
    manager
        .start_task(run.clone(), async { AnyResult::Ok("again") })
        .await
        .unwrap();
    manager.wait_all().await;
    let rerun = registry.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(rerun.output, Some(json!("again")));
    assert_eq!(statuses(&registry, &run_id).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_runs_wait_queued_in_order_and_a_full_queue_refuses() {
    let backend = sqlite_registry();
    let registry = backend.registry.clone();
    let limits = TaskLimits {
        max_concurrent: Some(2),
        max_queued: Some(3),
    };
    let manager = BackgroundTaskManager::with_limits(registry.clone(), limits);
    let (started, mut start_order) = mpsc::unbounded_channel::<usize>();
    let gate = Arc::new(Notify::new());
    let mut ids = Vec::new();
    for index in 0..5 {
        let started = started.clone();
        let gate = gate.clone();
        let run_id = manager
            .start_task(Run::new("limited", "Limited"), async move {
                started.send(index).unwrap();
                gate.notified().await;
                AnyResult::Ok(index)
            })
            .await
            .unwrap();
        ids.push(run_id);
    }
    // The first two start at once, on either worker thread: in any order.
    let mut first = [start_order.recv().await, start_order.recv().await];
    first.sort();
    assert_eq!(first, [Some(0), Some(1)]);
    wait_for_status(&registry, &ids[1], RunStatus::Running).await;
    for run_id in &ids[2..] {
        let run = registry.get_run(run_id).await.unwrap().unwrap();
        assert_eq!(
            run.status,
            RunStatus::Queued,
            "beyond the limit runs wait, visibly"
        );
    }
    assert_eq!(manager.queued_task_count(), 3);
    assert_eq!(manager.active_task_count(), 5);

    let refused = manager
        .start_task(Run::new("limited", "Limited"), async {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            Error::QueueFull {
                queued: 3,
                limit: 3
            }
        ),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("retry"), "{refused}");
    assert_eq!(
        registry.recent_runs(100).await.unwrap().len(),
        5,
        "a refused start records nothing"
    );

    // Cancelling a queued run frees its place; it never starts.
    assert!(manager.cancel_task(&ids[3]).await.unwrap());
    assert_eq!(manager.queued_task_count(), 2);

    // Each finished task lets the next waiting one start, first come first served.
    let mut order = vec![0, 1];
    while order.len() < 4 {
        gate.notify_one();
        order.push(
            tokio::time::timeout(DEADLINE, start_order.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(order, [0, 1, 2, 4]);
    gate.notify_waiters();
    while manager.active_task_count() > 0 {
        gate.notify_one();
        tokio::task::yield_now().await;
    }
    manager.wait_all().await;
    assert_eq!(
        statuses(&registry, &ids[3]).await,
        [RunStatus::Queued, RunStatus::Cancelled]
    );
    for index in [0, 1, 2, 4] {
        let run = registry.get_run(&ids[index]).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Completed, "task {index}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_quick_and_cancels_the_rest() {
    let backend = sqlite_registry();
    let registry = backend.registry.clone();
    let manager = BackgroundTaskManager::new(registry.clone());
    let quick = manager
        .start_task(Run::new("quick", "Quick"), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            AnyResult::Ok("made it")
        })
        .await
        .unwrap();
    let slow = manager
        .start_task(Run::new("slow", "Slow"), std::future::pending::<()>())
        .await
        .unwrap();
    wait_for_status(&registry, &slow, RunStatus::Running).await;

    let report = manager.shutdown(Duration::from_millis(500)).await.unwrap();
    assert_eq!(report.cancelled, std::slice::from_ref(&slow));
    assert_eq!(report.still_running, 0);
    assert_eq!(
        registry.get_run(&quick).await.unwrap().unwrap().status,
        RunStatus::Completed
    );
    let slow_run = registry.get_run(&slow).await.unwrap().unwrap();
    assert_eq!(slow_run.status, RunStatus::Cancelled);
    assert_eq!(
        slow_run.error_message.as_deref(),
        Some("cancelled: shutdown")
    );
    assert!(registry.active_runs().await.unwrap().is_empty());

    let refused = manager.start_task(Run::new("late", "Late"), async {}).await;
    assert!(matches!(refused, Err(Error::ShuttingDown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_its_deadline_when_work_ignores_cancellation() {
    let backend = sqlite_registry();
    let registry = backend.registry.clone();
    let manager = BackgroundTaskManager::new(registry.clone());
    let (blocking, released) = std::sync::mpsc::channel::<()>();
    // Work that blocks its thread and never reaches an await.
    let stuck = manager
        .start_task(Run::new("stuck", "Stuck"), async move {
            let _ = released.recv_timeout(DEADLINE);
        })
        .await
        .unwrap();
    wait_for_status(&registry, &stuck, RunStatus::Running).await;

    let grace = Duration::from_millis(100);
    let started = std::time::Instant::now();
    let report = manager.shutdown(grace).await.unwrap();
    let took = started.elapsed();
    assert!(
        took < grace + modrun::manager::STOP_WAIT + Duration::from_secs(1),
        "shutdown took {took:?}"
    );
    assert_eq!(report.cancelled, std::slice::from_ref(&stuck));
    assert_eq!(report.still_running, 1);
    let run = registry.get_run(&stuck).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
    drop(blocking);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reasons_are_recorded() {
    let backend = memory_registry();
    let registry = backend.registry.clone();
    let manager = BackgroundTaskManager::new(registry.clone());
    let run_id = manager
        .start_task(Run::new("x", "X"), std::future::pending::<()>())
        .await
        .unwrap();
    wait_until("the task is active", || manager.is_task_active(&run_id)).await;
    let reason = CancelReason::Other("the operator needed the slot".into());
    assert!(manager.cancel_task_because(&run_id, reason).await.unwrap());
    let history = registry.history(&run_id).await.unwrap();
    assert_eq!(
        history.last().unwrap().message.as_deref(),
        Some("cancelled: the operator needed the slot")
    );
    manager.wait_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_abandoned_by_its_caller_still_runs_to_the_end() {
    let backend = sqlite_registry();
    let registry = backend.registry.clone();
    let manager = BackgroundTaskManager::with_limits(
        registry.clone(),
        TaskLimits {
            max_concurrent: Some(1),
            max_queued: Some(1),
        },
    );
    // Poll a start once (it waits for the registry's commit), then drop it,
    // as a server does when its client hangs up. A start may, rarely, finish
    // within its first poll; try until one is truly abandoned while waiting.
    let mut abandoned = Vec::new();
    for _ in 0..100 {
        let run = Run::new("a", "A");
        let mut start = Box::pin(manager.start_task(run.clone(), async { AnyResult::Ok("ran") }));
        let first_poll =
            std::future::poll_fn(|cx| std::task::Poll::Ready(start.as_mut().poll(cx))).await;
        drop(start);
        manager.wait_all().await;
        if first_poll.is_pending() {
            abandoned.push(run.run_id);
            break;
        }
    }
    assert_eq!(
        abandoned.len(),
        1,
        "no start was ever still waiting after one poll"
    );
    let recorded = registry.get_run(&abandoned[0]).await.unwrap().unwrap();
    assert_eq!(recorded.status, RunStatus::Completed, "never left queued");
    assert_eq!(recorded.output, Some(json!("ran")));
    // Its slot was given back: another run starts and completes.
    let next = manager
        .start_task(Run::new("b", "B"), async {})
        .await
        .unwrap();
    manager.wait_all().await;
    assert_eq!(
        registry.get_run(&next).await.unwrap().unwrap().status,
        RunStatus::Completed
    );
    assert_eq!(manager.active_task_count(), 0);
}

#[tokio::test]
async fn start_task_gives_a_handle_that_waits_for_the_output() {
    let manager = BackgroundTaskManager::new(RunRegistry::in_memory());
    let (go, gate) = oneshot::channel::<()>();
    let handle = manager
        .start_task(Run::new("report", "Report"), async move {
            let _ = gate.await;
            AnyResult::Ok(json!({"rows": 3}))
        })
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.wait().await }
    });
    go.send(()).unwrap();
    let run = waiting.await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.output, Some(json!({"rows": 3})));
    assert_eq!(run.run_id, handle.id());

    let blocked = manager
        .start_task(
            Run::new("report", "Report"),
            std::future::pending::<AnyResult<()>>(),
        )
        .await
        .unwrap();
    assert!(blocked.cancel().await.unwrap());
    assert_eq!(blocked.wait().await.unwrap().status, RunStatus::Cancelled);
}

/// Starts one task per `(name, priority)` while a blocker holds the one
/// slot, then lets the blocker finish: the names in the order they start.
async fn start_order(
    manager: &BackgroundTaskManager,
    runs: &[(&'static str, i16)],
) -> Vec<&'static str> {
    let (started, mut order) = mpsc::unbounded_channel::<&'static str>();
    let (release, released) = oneshot::channel::<()>();
    let blocker = manager
        .start_task(Run::new("blocker", "Blocker"), async move {
            let _ = released.await;
        })
        .await
        .unwrap();
    wait_for_status(manager.registry(), blocker.id(), RunStatus::Running).await;
    for &(name, priority) in runs {
        let started = started.clone();
        manager
            .start_task(Run::new(name, name).with_priority(priority), async move {
                started.send(name).unwrap();
            })
            .await
            .unwrap();
    }
    release.send(()).unwrap();
    let mut names = Vec::new();
    while names.len() < runs.len() {
        let name = tokio::time::timeout(DEADLINE, order.recv()).await.unwrap();
        names.push(name.unwrap());
    }
    names
}

async fn waiting_runs_start_by_priority_then_first_come(registry: RunRegistry) {
    let limits = TaskLimits {
        max_concurrent: Some(1),
        max_queued: None,
    };
    let manager = BackgroundTaskManager::with_limits(registry.clone(), limits);
    let order = start_order(
        &manager,
        &[
            ("low", 0),
            ("urgent", 9),
            ("background", -5),
            ("soon", 3),
            ("also-urgent", 9),
        ],
    )
    .await;
    assert_eq!(
        order,
        ["urgent", "also-urgent", "soon", "low", "background"]
    );
    manager.wait_all().await;
    let filter = modrun::RunFilter {
        module_id: Some("urgent".into()),
        ..modrun::RunFilter::default()
    };
    let urgent = registry.list_runs(&filter).await.unwrap();
    assert_eq!(urgent[0].priority, 9, "the registry keeps the priority");
}

async fn a_run_not_due_waits_queued_until_its_time(registry: RunRegistry) {
    let limits = TaskLimits {
        max_concurrent: Some(2),
        max_queued: Some(1),
    };
    let manager = BackgroundTaskManager::with_limits(registry.clone(), limits);
    let not_before = chrono::Utc::now() + chrono::TimeDelta::milliseconds(400);
    let later = manager
        .start_task(
            Run::new("later", "Later").with_not_before(not_before),
            async { AnyResult::Ok(chrono::Utc::now()) },
        )
        .await
        .unwrap();
    let run = registry.get_run(later.id()).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Queued, "free slots, but not due");
    assert_eq!(run.not_before, Some(not_before));
    // Waiting for its time, it counts against the queue's bound.
    let refused = manager
        .start_task(Run::new("far", "Far").with_not_before(not_before), async {})
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::QueueFull { .. }), "{refused:?}");
    // Meanwhile the free slots serve runs that are due.
    let now = manager
        .start_task(Run::new("now", "Now"), async {})
        .await
        .unwrap();
    assert_eq!(now.wait().await.unwrap().status, RunStatus::Completed);
    let ended = later.wait().await.unwrap();
    assert_eq!(ended.status, RunStatus::Completed);
    let started = ended.started_at.unwrap();
    assert!(
        started >= not_before,
        "started {started}, not before {not_before}"
    );
    let ran_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(ended.output.unwrap()).unwrap();
    assert!(
        ran_at >= not_before,
        "ran {ran_at}, not before {not_before}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cancelled_before_its_time_never_starts() {
    let backend = sqlite_registry();
    let registry = backend.registry.clone();
    let manager = BackgroundTaskManager::new(registry.clone());
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let at = chrono::Utc::now() + chrono::TimeDelta::hours(1);
    let handle = manager
        .start_task(Run::new("later", "Later").with_not_before(at), async move {
            flag.store(true, Ordering::SeqCst);
        })
        .await
        .unwrap();
    assert!(handle.cancel().await.unwrap());
    manager.wait_all().await;
    assert!(!ran.load(Ordering::SeqCst));
    assert_eq!(
        statuses(&registry, handle.id()).await,
        [RunStatus::Queued, RunStatus::Cancelled]
    );
    assert_eq!(manager.active_task_count(), 0);
}
