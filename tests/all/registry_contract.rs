use std::time::Duration;

use modrun::{
    Error, Progress, Run, RunEvent, RunFilter, RunRegistry, RunStatus, RunStore, Transition,
};
use serde_json::json;

use crate::support::statuses;

/// Runs each contract test once per backend.
macro_rules! contract {
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
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(backend) = crate::support::postgres_registry().await else {
                        return;
                    };
                    super::$name(backend.registry.clone()).await;
                }
            )*
        }
    };
}

/// Runs each queue contract test once per backend, on the store itself:
/// the queue's verbs are the store's.
macro_rules! queue_contract {
    ($($name:ident),* $(,)?) => {
        mod memory_queue {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&modrun::registry::MemoryStore::default()).await;
                }
            )*
        }
        mod sqlite_queue {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = modrun::registry::SqliteStore::open(
                        dir.path().join("registry.db"),
                        modrun::registry::SqliteOptions::default(),
                    )
                    .unwrap();
                    super::$name(&store).await;
                }
            )*
        }
        mod postgres_queue {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(url) = crate::support::database_url() else {
                        return;
                    };
                    let options = modrun::registry::PostgresOptions {
                        schema: crate::support::fresh_schema(),
                        ..modrun::registry::PostgresOptions::default()
                    };
                    let store = modrun::registry::PostgresStore::connect(&url, options)
                        .await
                        .unwrap();
                    super::$name(&store).await;
                }
            )*
        }
    };
}

queue_contract!(
    queued_runs_are_claimed_oldest_first_within_what_each_version_wants,
    queued_runs_are_claimed_by_priority_then_as_they_became_due,
    a_run_given_back_is_claimed_again_as_its_next_attempt,
    a_run_claimed_as_it_is_queued_has_both_entries_and_its_first_attempt,
    a_run_claimed_as_it_is_recorded_takes_over_its_queued_record_or_a_finished_id,
    the_next_due_time_is_the_earliest_not_before_time_to_come_of_runs_any_claimer_may_take,
);

contract!(
    a_run_reads_back_as_it_was_added,
    unknown_runs_are_absent,
    history_records_every_status_change_in_order,
    a_finished_run_never_changes_again,
    update_run_replaces_the_record_and_logs_status_changes,
    a_fresh_queued_run_given_to_update_run_reuses_a_finished_id,
    a_tally_counts_every_status_and_lists_runs_ended_lately,
    update_run_refuses_what_the_flow_forbids,
    an_active_id_cannot_be_added_twice,
    a_finished_id_is_replaced_with_a_fresh_history,
    queries_filter_and_order_newest_first,
    cleanup_deletes_only_old_finished_runs,
    a_cleanup_applies_module_limits_and_counts_what_it_would_remove,
    progress_is_stored_for_active_runs_only,
    the_latest_progress_reported_before_an_end_is_kept,
    subscribers_see_every_change_in_order,
    racing_terminal_changes_have_exactly_one_winner,
    status_changes_stay_cheap_with_many_runs,
    hostile_text_is_stored,
    many_ends_at_once_apply_to_exactly_the_active_runs,
    many_adds_at_once_keep_the_rules_for_taken_ids,
    a_start_with_an_idempotency_key_is_recorded_once,
);

/// A run as the registry holds it, but for the node the store recorded
/// for it (a store shared by nodes says which one executes it).
async fn read_back(registry: &RunRegistry, run_id: &str) -> Option<Run> {
    let mut run = registry.get_run(run_id).await.unwrap()?;
    run.node = None;
    Some(run)
}

fn sample_run(module: &str) -> Run {
    let run = Run::new(module, format!("{module} module"));
    let not_before = run.created_at + chrono::TimeDelta::hours(1);
    run.with_parameters(json!({
        "name": "Zoë 🌍",
        "count": 3,
        "nested": {"list": [1, 2.5, null, true]},
    }))
    .with_priority(-2)
    .with_not_before(not_before)
}

async fn a_run_reads_back_as_it_was_added(registry: RunRegistry) {
    let mut run = sample_run("hello");
    run.module_version = Some("sha256:abc".into());
    registry.add_run(&run).await.unwrap();
    assert_eq!(read_back(&registry, &run.run_id).await, Some(run.clone()));
    let listed = registry
        .list_summaries(&RunFilter::default())
        .await
        .unwrap();
    assert_eq!(listed, [modrun::registry::RunSummary::from(&run)]);
    let history = registry.history(&run.run_id).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].status, RunStatus::Queued);
    assert_eq!(history[0].at, run.created_at);
}

async fn unknown_runs_are_absent(registry: RunRegistry) {
    assert_eq!(registry.get_run("no-such-run").await.unwrap(), None);
    assert!(registry.history("no-such-run").await.unwrap().is_empty());
    assert!(
        !registry
            .transition(&Transition::running("no-such-run"))
            .await
            .unwrap()
    );
    let missing = Run::new("hello", "Hello").with_id("no-such-run");
    assert!(matches!(
        registry.update_run(&missing).await,
        Err(Error::RunNotFound(id)) if id == "no-such-run"
    ));
}

async fn history_records_every_status_change_in_order(registry: RunRegistry) {
    let run = sample_run("hello");
    registry.add_run(&run).await.unwrap();
    assert!(
        registry
            .transition(&Transition::running(&run.run_id))
            .await
            .unwrap()
    );
    let done = Transition::completed(&run.run_id, json!({"greeting": "hi"}));
    assert!(registry.transition(&done).await.unwrap());

    let stored = registry.get_run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Completed);
    assert_eq!(stored.exit_code, Some(0));
    assert_eq!(stored.output, Some(json!({"greeting": "hi"})));
    assert_eq!(stored.completed_at, Some(done.at));
    let started = stored.started_at.expect("started_at set");
    assert!(stored.created_at <= started && started <= done.at);

    let history = registry.history(&run.run_id).await.unwrap();
    let seen: Vec<_> = history.iter().map(|c| c.status).collect();
    assert_eq!(
        seen,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Completed]
    );
    assert!(history.windows(2).all(|pair| pair[0].at <= pair[1].at));
    assert_eq!(history[1].at, started);
}

async fn a_finished_run_never_changes_again(registry: RunRegistry) {
    let run = sample_run("hello");
    registry.add_run(&run).await.unwrap();
    let failed = Transition::failed(&run.run_id, 1, "boom");
    assert!(registry.transition(&failed).await.unwrap());
    for late in [
        Transition::running(&run.run_id),
        Transition::completed(&run.run_id, json!(1)),
        Transition::cancelled(&run.run_id, "cancelled by user"),
        Transition::failed(&run.run_id, 1, "again"),
    ] {
        assert!(
            !registry.transition(&late).await.unwrap(),
            "{:?} applied",
            late.to
        );
    }
    assert!(
        !registry
            .set_progress(
                &run.run_id,
                Progress {
                    fraction: 0.5,
                    message: "late".into()
                }
            )
            .await
            .unwrap()
    );
    let mut edited = registry.get_run(&run.run_id).await.unwrap().unwrap();
    edited.error_message = Some("rewritten".into());
    assert!(matches!(
        registry.update_run(&edited).await,
        Err(Error::RunFinished {
            status: RunStatus::Failed,
            ..
        })
    ));

    let stored = registry.get_run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Failed);
    assert_eq!(stored.error_message.as_deref(), Some("boom"));
    assert_eq!(stored.progress, None);
    let history = registry.history(&run.run_id).await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].message.as_deref(), Some("boom"));
}

async fn a_fresh_queued_run_given_to_update_run_reuses_a_finished_id(registry: RunRegistry) {
    let run = sample_run("hello");
    registry.add_run(&run).await.unwrap();
    assert!(
        registry
            .transition(&Transition::running(&run.run_id))
            .await
            .unwrap()
    );
    let done = Transition::completed(&run.run_id, json!({"first": true}));
    assert!(registry.transition(&done).await.unwrap());

    // The guide's code: a fresh Queued run with the old id, then a start.
    let mut again = Run::new("hello", "hello module").with_parameters(json!({"second": true}));
    again.run_id = run.run_id.clone();
    registry.update_run(&again).await.unwrap();
    let stored = registry.get_run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Queued);
    assert_eq!(json!(stored.parameters), json!({"second": true}));
    assert_eq!(stored.output, None);
    let history = registry.history(&run.run_id).await.unwrap();
    assert_eq!(
        history
            .iter()
            .map(|change| change.status)
            .collect::<Vec<_>>(),
        [RunStatus::Queued],
        "a new history"
    );

    // Any other change to a finished run stays refused.
    assert!(
        registry
            .transition(&Transition::running(&run.run_id))
            .await
            .unwrap()
    );
    assert!(
        registry
            .transition(&Transition::failed(&run.run_id, 1, "boom"))
            .await
            .unwrap()
    );
    let mut running = registry.get_run(&run.run_id).await.unwrap().unwrap();
    running.status = RunStatus::Running;
    assert!(matches!(
        registry.update_run(&running).await,
        Err(Error::RunFinished { .. })
    ));
}

async fn a_tally_counts_every_status_and_lists_runs_ended_lately(registry: RunRegistry) {
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut ids = Vec::new();
    for (module, end) in [
        ("a", Some(RunStatus::Completed)),
        ("a", Some(RunStatus::Failed)),
        ("b", Some(RunStatus::Completed)),
        ("b", Some(RunStatus::Cancelled)),
        ("b", None),
        ("c", None),
    ] {
        let run = sample_run(module);
        registry.add_run(&run).await.unwrap();
        if end.is_some() || module == "b" {
            assert!(
                registry
                    .transition(&Transition::running(&run.run_id))
                    .await
                    .unwrap()
            );
        }
        let change = match end {
            Some(RunStatus::Completed) => Transition::completed(&run.run_id, json!(1)),
            Some(RunStatus::Failed) => Transition::failed(&run.run_id, 1, "boom"),
            Some(_) => Transition::cancelled(&run.run_id, "stop"),
            None => continue,
        };
        assert!(registry.transition(&change).await.unwrap());
        ids.push(run.run_id);
    }
    let tally = registry.tally(before, 100).await.unwrap();
    assert_eq!(
        tally.counts,
        [
            (RunStatus::Queued, 1),
            (RunStatus::Running, 1),
            (RunStatus::Completed, 2),
            (RunStatus::Failed, 1),
            (RunStatus::Cancelled, 1),
        ]
    );
    assert_eq!(tally.ended.len(), 4);
    assert!(
        tally
            .ended
            .windows(2)
            .all(|pair| pair[0].completed_at >= pair[1].completed_at),
        "newest first"
    );
    let failed = tally
        .ended
        .iter()
        .find(|ended| ended.status == RunStatus::Failed)
        .unwrap();
    assert_eq!(failed.module_id, "a");
    assert!(failed.started_at.is_some());
    assert_eq!(registry.tally(before, 3).await.unwrap().ended.len(), 3);
    let later = chrono::Utc::now() + chrono::Duration::seconds(5);
    assert!(registry.tally(later, 100).await.unwrap().ended.is_empty());
}

async fn update_run_replaces_the_record_and_logs_status_changes(registry: RunRegistry) {
    let mut run = sample_run("hello");
    registry.add_run(&run).await.unwrap();

    run.module_version = Some("v2".into());
    registry.update_run(&run).await.unwrap();
    assert_eq!(statuses(&registry, &run.run_id).await, [RunStatus::Queued]);

    run.status = RunStatus::Running;
    run.started_at = Some(chrono::Utc::now());
    registry.update_run(&run).await.unwrap();
    run.status = RunStatus::Failed;
    run.error_message = Some("disk full".into());
    run.exit_code = Some(1);
    registry.update_run(&run).await.unwrap();

    assert_eq!(read_back(&registry, &run.run_id).await, Some(run.clone()));
    let history = registry.history(&run.run_id).await.unwrap();
    let seen: Vec<_> = history.iter().map(|c| c.status).collect();
    assert_eq!(
        seen,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Failed]
    );
    assert_eq!(history[2].message.as_deref(), Some("disk full"));
}

async fn update_run_refuses_what_the_flow_forbids(registry: RunRegistry) {
    let mut run = sample_run("hello");
    registry.add_run(&run).await.unwrap();
    assert!(
        registry
            .transition(&Transition::running(&run.run_id))
            .await
            .unwrap()
    );
    run.status = RunStatus::Queued;
    assert!(matches!(
        registry.update_run(&run).await,
        Err(Error::InvalidTransition {
            from: RunStatus::Running,
            to: RunStatus::Queued,
            ..
        })
    ));
    assert_eq!(
        statuses(&registry, &run.run_id).await,
        [RunStatus::Queued, RunStatus::Running]
    );
}

async fn an_active_id_cannot_be_added_twice(registry: RunRegistry) {
    let run = sample_run("hello");
    registry.add_run(&run).await.unwrap();
    let again = sample_run("other").with_id(&run.run_id);
    let refused = registry.add_run(&again).await.unwrap_err();
    assert!(matches!(
        refused,
        Error::RunActive {
            status: RunStatus::Queued,
            ..
        }
    ));
    assert!(refused.to_string().contains(&run.run_id), "{refused}");
    assert_eq!(read_back(&registry, &run.run_id).await, Some(run));
}

async fn a_finished_id_is_replaced_with_a_fresh_history(registry: RunRegistry) {
    let first = sample_run("hello");
    registry.add_run(&first).await.unwrap();
    registry
        .transition(&Transition::running(&first.run_id))
        .await
        .unwrap();
    registry
        .transition(&Transition::completed(&first.run_id, json!("one")))
        .await
        .unwrap();

    let second = sample_run("other").with_id(&first.run_id);
    registry.add_run(&second).await.unwrap();
    assert_eq!(read_back(&registry, &first.run_id).await, Some(second));
    assert_eq!(
        statuses(&registry, &first.run_id).await,
        [RunStatus::Queued]
    );
}

async fn queries_filter_and_order_newest_first(registry: RunRegistry) {
    let mut ids = Vec::new();
    for (index, module) in ["a", "b", "a", "c", "a"].into_iter().enumerate() {
        let mut run = sample_run(module);
        // Distinct, increasing creation times, whatever the clock's resolution.
        run.created_at = chrono::DateTime::from_timestamp(1_700_000_000 + index as i64, 0).unwrap();
        registry.add_run(&run).await.unwrap();
        ids.push(run.run_id);
    }
    registry
        .transition(&Transition::running(&ids[1]))
        .await
        .unwrap();
    registry
        .transition(&Transition::running(&ids[2]))
        .await
        .unwrap();
    registry
        .transition(&Transition::completed(&ids[2], json!(null)))
        .await
        .unwrap();
    registry
        .transition(&Transition::cancelled(&ids[3], "cancelled by user"))
        .await
        .unwrap();

    let ids_of = |runs: Vec<Run>| runs.into_iter().map(|r| r.run_id).collect::<Vec<_>>();
    let newest_first = |picks: &[usize]| picks.iter().map(|&i| ids[i].clone()).collect::<Vec<_>>();

    assert_eq!(
        ids_of(registry.active_runs().await.unwrap()),
        newest_first(&[4, 1, 0])
    );
    assert_eq!(
        ids_of(registry.runs_by_module("a").await.unwrap()),
        newest_first(&[4, 2, 0])
    );
    assert!(registry.runs_by_module("zzz").await.unwrap().is_empty());
    assert_eq!(
        ids_of(registry.runs_by_status(RunStatus::Completed).await.unwrap()),
        newest_first(&[2])
    );
    assert_eq!(
        ids_of(registry.runs_by_status(RunStatus::Running).await.unwrap()),
        newest_first(&[1])
    );
    assert_eq!(
        ids_of(registry.recent_runs(3).await.unwrap()),
        newest_first(&[4, 3, 2])
    );
    assert_eq!(registry.recent_runs(0).await.unwrap(), vec![]);
    let filtered = registry
        .list_runs(&RunFilter {
            statuses: vec![RunStatus::Queued, RunStatus::Completed],
            module_id: Some("a".into()),
            limit: Some(2),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ids_of(filtered), newest_first(&[4, 2]));
}

async fn cleanup_deletes_only_old_finished_runs(registry: RunRegistry) {
    let old_done = sample_run("a");
    let old_failed = sample_run("a");
    let recent_done = sample_run("a");
    let old_active = sample_run("a");
    for run in [&old_done, &old_failed, &recent_done, &old_active] {
        registry.add_run(run).await.unwrap();
    }
    let long_ago = chrono::Utc::now() - chrono::Duration::days(30);
    let mut done = Transition::completed(&old_done.run_id, json!(1));
    done.at = long_ago;
    let mut failed = Transition::failed(&old_failed.run_id, 1, "x");
    failed.at = long_ago;
    registry.transition(&done).await.unwrap();
    registry.transition(&failed).await.unwrap();
    registry
        .transition(&Transition::completed(&recent_done.run_id, json!(2)))
        .await
        .unwrap();
    let mut running = Transition::running(&old_active.run_id);
    running.at = long_ago;
    registry.transition(&running).await.unwrap();

    let day = Duration::from_secs(86_400);
    assert_eq!(registry.cleanup_old_runs(day).await.unwrap(), 2);
    assert_eq!(registry.get_run(&old_done.run_id).await.unwrap(), None);
    assert!(
        registry
            .history(&old_failed.run_id)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        registry
            .get_run(&recent_done.run_id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        registry
            .get_run(&old_active.run_id)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(registry.cleanup_old_runs(day).await.unwrap(), 0);
    assert_eq!(registry.cleanup_old_runs(Duration::MAX).await.unwrap(), 0);
    assert_eq!(registry.cleanup_old_runs(Duration::ZERO).await.unwrap(), 1);
}

async fn a_cleanup_applies_module_limits_and_counts_what_it_would_remove(registry: RunRegistry) {
    let days = |n: i64| chrono::Utc::now() - chrono::Duration::days(n);
    // (module, how it ended, days ago)
    let plan = [
        ("a", RunStatus::Failed, 40),
        ("a", RunStatus::Completed, 40),
        ("a", RunStatus::Cancelled, 40),
        ("b", RunStatus::Failed, 40),
        ("b", RunStatus::Completed, 20),
        ("c", RunStatus::Completed, 5),
    ];
    let mut ids = Vec::new();
    for (module, status, ago) in plan {
        let run = sample_run(module);
        registry.add_run(&run).await.unwrap();
        let mut end = match status {
            RunStatus::Failed => Transition::failed(&run.run_id, 1, "x"),
            RunStatus::Cancelled => Transition::cancelled(&run.run_id, "x"),
            _ => Transition::completed(&run.run_id, json!(1)),
        };
        end.at = days(ago);
        assert!(registry.transition(&end).await.unwrap());
        ids.push(run.run_id);
    }
    let active = sample_run("a");
    registry.add_run(&active).await.unwrap();

    // 30 days, but b keeps its runs 10 days and its failures 60.
    let cleanup = modrun::registry::Cleanup {
        before: days(30),
        statuses: Vec::new(),
        module_id: None,
        overrides: vec![
            modrun::registry::Override {
                module_id: "b".into(),
                status: None,
                before: days(10),
            },
            modrun::registry::Override {
                module_id: "b".into(),
                status: Some(RunStatus::Failed),
                before: days(60),
            },
        ],
    };
    let only_failed = modrun::registry::Cleanup {
        statuses: vec![RunStatus::Failed],
        ..cleanup.clone()
    };
    let only_c = modrun::registry::Cleanup {
        module_id: Some("c".into()),
        ..cleanup.clone()
    };
    assert_eq!(registry.count_finished(&only_failed).await.unwrap(), 1);
    assert_eq!(registry.count_finished(&only_c).await.unwrap(), 0);
    assert_eq!(registry.count_finished(&cleanup).await.unwrap(), 4);
    // Counting removed nothing.
    for run_id in &ids {
        assert!(registry.get_run(run_id).await.unwrap().is_some());
    }
    assert_eq!(registry.cleanup(&cleanup).await.unwrap(), 4);
    let left: Vec<bool> =
        futures_util::future::join_all(ids.iter().map(|run_id| registry.get_run(run_id)))
            .await
            .into_iter()
            .map(|run| run.unwrap().is_some())
            .collect();
    assert_eq!(left, [false, false, false, true, false, true]);
    assert!(registry.get_run(&active.run_id).await.unwrap().is_some());
    assert_eq!(registry.retention_stats().removed, 4);
    assert!(registry.retention_stats().last_cleanup.is_some());
}

async fn progress_is_stored_for_active_runs_only(registry: RunRegistry) {
    let run = sample_run("countdown");
    registry.add_run(&run).await.unwrap();
    registry
        .transition(&Transition::running(&run.run_id))
        .await
        .unwrap();
    let progress = Progress {
        fraction: 0.25,
        message: "one of four".into(),
    };
    assert!(
        registry
            .set_progress(&run.run_id, progress.clone())
            .await
            .unwrap()
    );
    let stored = registry.get_run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(stored.progress, Some(progress));
    assert!(
        !registry
            .set_progress(
                "no-such-run",
                Progress {
                    fraction: 1.0,
                    message: String::new()
                }
            )
            .await
            .unwrap()
    );
    // Progress is not a status change.
    assert_eq!(
        statuses(&registry, &run.run_id).await,
        [RunStatus::Queued, RunStatus::Running]
    );
}

async fn the_latest_progress_reported_before_an_end_is_kept(registry: RunRegistry) {
    let (ending, going_on) = (sample_run("countdown"), sample_run("countdown"));
    for run in [&ending, &going_on] {
        registry.add_run(run).await.unwrap();
        registry
            .transition(&Transition::running(&run.run_id))
            .await
            .unwrap();
    }
    let progress = |fraction: f64| Progress {
        fraction,
        message: format!("{fraction} done"),
    };
    // Reported, not awaited, then the end at once: one commit may carry
    // them all (a store may write the progress with the end).
    for fraction in [0.5, 0.75, 1.0] {
        registry
            .report_progress(&ending.run_id, "countdown", progress(fraction))
            .unwrap();
    }
    registry
        .report_progress(&going_on.run_id, "countdown", progress(0.25))
        .unwrap();
    let end = Transition::completed(&ending.run_id, json!("done"));
    assert!(registry.transition(&end).await.unwrap());
    let ended = registry.get_run(&ending.run_id).await.unwrap().unwrap();
    assert_eq!(ended.status, RunStatus::Completed);
    assert_eq!(ended.progress, Some(progress(1.0)));
    // The other run's report is written too, once the store flushes.
    registry.flush().await.unwrap();
    let other = registry.get_run(&going_on.run_id).await.unwrap().unwrap();
    assert_eq!(other.progress, Some(progress(0.25)));
    // A report after the end changes nothing.
    registry
        .report_progress(&ending.run_id, "countdown", progress(0.1))
        .unwrap();
    registry.flush().await.unwrap();
    let still = registry.get_run(&ending.run_id).await.unwrap().unwrap();
    assert_eq!(still.progress, Some(progress(1.0)));
}

async fn subscribers_see_every_change_in_order(registry: RunRegistry) {
    let mut events = registry.subscribe();
    let run = sample_run("hello");
    registry.add_run(&run).await.unwrap();
    registry
        .transition(&Transition::running(&run.run_id))
        .await
        .unwrap();
    registry
        .set_progress(
            &run.run_id,
            Progress {
                fraction: 0.5,
                message: "half".into(),
            },
        )
        .await
        .unwrap();
    registry
        .transition(&Transition::cancelled(&run.run_id, "cancelled by user"))
        .await
        .unwrap();
    // Refused changes publish nothing.
    registry
        .transition(&Transition::running(&run.run_id))
        .await
        .unwrap();

    let mut seen = Vec::new();
    for _ in 0..4 {
        let event = tokio::time::timeout(crate::support::DEADLINE, events.recv())
            .await
            .expect("event within the deadline")
            .expect("no lag");
        assert_eq!(event.run_id(), run.run_id);
        seen.push(match event {
            RunEvent::Status {
                change, module_id, ..
            } => {
                assert_eq!(module_id, "hello");
                change.status.to_string()
            }
            RunEvent::Progress { progress, .. } => format!("progress {}", progress.fraction),
            RunEvent::Log { entry, .. } => format!("log {}", entry.message),
        });
    }
    assert_eq!(seen, ["queued", "running", "progress 0.5", "cancelled"]);
    assert!(events.try_recv().is_err(), "no event for a refused change");
}

async fn racing_terminal_changes_have_exactly_one_winner(registry: RunRegistry) {
    for _ in 0..50 {
        let run = sample_run("race");
        registry.add_run(&run).await.unwrap();
        registry
            .transition(&Transition::running(&run.run_id))
            .await
            .unwrap();
        let changes = [
            Transition::completed(&run.run_id, json!("done")),
            Transition::cancelled(&run.run_id, "cancelled by user"),
            Transition::failed(&run.run_id, 1, "failed"),
        ];
        let handles: Vec<_> = changes
            .into_iter()
            .map(|change| {
                let registry = registry.clone();
                tokio::spawn(
                    async move { (change.to, registry.transition(&change).await.unwrap()) },
                )
            })
            .collect();
        let mut winners = Vec::new();
        for handle in handles {
            let (status, won) = handle.await.unwrap();
            if won {
                winners.push(status);
            }
        }
        assert_eq!(winners.len(), 1, "winners: {winners:?}");
        let stored = registry.get_run(&run.run_id).await.unwrap().unwrap();
        assert_eq!(stored.status, winners[0]);
        let history = statuses(&registry, &run.run_id).await;
        assert_eq!(history, [RunStatus::Queued, RunStatus::Running, winners[0]]);
    }
}

async fn status_changes_stay_cheap_with_many_runs(registry: RunRegistry) {
    // Not a timing test (that is the benchmark's job): it checks that a
    // registry holding thousands of runs still finds and changes each one.
    let runs: Vec<Run> = (0..2_000).map(|_| sample_run("bulk")).collect();
    let writes = runs.iter().map(|run| {
        let registry = registry.clone();
        let run = run.clone();
        async move { registry.add_run(&run).await }
    });
    for result in futures_util::future::join_all(writes).await {
        result.unwrap();
    }
    let changes = runs.iter().map(|run| {
        let registry = registry.clone();
        let id = run.run_id.clone();
        async move { registry.transition(&Transition::running(&id)).await }
    });
    for applied in futures_util::future::join_all(changes).await {
        assert!(applied.unwrap());
    }
    assert_eq!(
        registry
            .runs_by_status(RunStatus::Running)
            .await
            .unwrap()
            .len(),
        2_000
    );
    assert_eq!(registry.recent_runs(10).await.unwrap().len(), 10);
}

async fn hostile_text_is_stored(registry: RunRegistry) {
    // A module names itself and fails as it likes: a NUL character in
    // either must not make its run's writes fail (PostgreSQL text cannot
    // hold one, and stores it as U+FFFD).
    let run = Run::new("nul", "a\0name 🌍");
    registry.add_run(&run).await.unwrap();
    assert!(
        registry
            .transition(&Transition::running(&run.run_id))
            .await
            .unwrap()
    );
    assert!(
        registry
            .transition(&Transition::failed(&run.run_id, 1, "bad\0news"))
            .await
            .unwrap()
    );
    let stored = registry.get_run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Failed);
    let message = stored.error_message.unwrap();
    assert!(
        message == "bad\0news" || message == "bad\u{FFFD}news",
        "{message:?}"
    );
    assert!(stored.module_name.ends_with("name 🌍"));
}

async fn many_ends_at_once_apply_to_exactly_the_active_runs(registry: RunRegistry) {
    // Concurrent changes share commits (and, on PostgreSQL, statements):
    // each still applies exactly as the status flow says.
    let runs: Vec<Run> = (0..200).map(|_| sample_run("ends")).collect();
    for run in &runs {
        registry.add_run(run).await.unwrap();
    }
    let all = |change: fn(&String) -> Transition| {
        futures_util::future::join_all(runs.iter().map(|run| {
            let (registry, change) = (registry.clone(), change(&run.run_id));
            async move { registry.transition(&change).await.unwrap() }
        }))
    };
    assert!(
        all(|run_id| Transition::running(run_id))
            .await
            .into_iter()
            .all(|applied| applied)
    );
    for run in &runs[..100] {
        assert!(
            registry
                .transition(&Transition::completed(&run.run_id, json!(1)))
                .await
                .unwrap()
        );
    }
    let failed = all(|run_id| Transition::failed(run_id, 1, "late")).await;
    for (index, (run, applied)) in runs.iter().zip(failed).enumerate() {
        let stored = registry.get_run(&run.run_id).await.unwrap().unwrap();
        let expected = if index < 100 {
            RunStatus::Completed
        } else {
            RunStatus::Failed
        };
        assert_eq!(applied, index >= 100, "run {index}");
        assert_eq!(stored.status, expected, "run {index}");
        assert_eq!(registry.history(&run.run_id).await.unwrap().len(), 3);
    }
}

async fn many_adds_at_once_keep_the_rules_for_taken_ids(registry: RunRegistry) {
    // Adds that share a commit (on PostgreSQL, a statement) still replace
    // a finished run and refuse an active one, each alone.
    let finished = sample_run("taken");
    let active = sample_run("taken");
    for run in [&finished, &active] {
        registry.add_run(run).await.unwrap();
    }
    assert!(
        registry
            .transition(&Transition::cancelled(&finished.run_id, "done"))
            .await
            .unwrap()
    );
    let mut adds: Vec<Run> = (0..50).map(|_| sample_run("fresh")).collect();
    adds.push(sample_run("again").with_id(&finished.run_id));
    adds.push(sample_run("again").with_id(&active.run_id));
    let results = futures_util::future::join_all(adds.iter().map(|run| {
        let registry = registry.clone();
        async move { registry.add_run(run).await }
    }))
    .await;
    for (run, result) in adds.iter().zip(results) {
        if run.run_id == active.run_id {
            assert!(matches!(result, Err(Error::RunActive { .. })), "{result:?}");
        } else {
            result.unwrap();
            let stored = registry.get_run(&run.run_id).await.unwrap().unwrap();
            assert_eq!(stored.module_id, run.module_id);
            assert_eq!(stored.status, RunStatus::Queued);
            assert_eq!(registry.history(&run.run_id).await.unwrap().len(), 1);
        }
    }
    let kept = registry.get_run(&active.run_id).await.unwrap().unwrap();
    assert_eq!(kept.module_id, "taken", "the active run is left as it was");
}

async fn a_start_with_an_idempotency_key_is_recorded_once(registry: RunRegistry) {
    let plugins = crate::support::plugins_dir(&["hello"]);
    let host = modrun::ModuleHost::new(crate::support::test_host_config()).unwrap();
    host.load_dir(plugins.path()).await.unwrap();
    let runner =
        modrun::ModuleRunner::new(host, modrun::BackgroundTaskManager::new(registry.clone()));
    let ada = json!({"name": "Ada"});
    // Retries racing the first start: one run, one id for all.
    let starts = (0..8).map(|_| runner.start_idempotent("hello", ada.clone(), "order-17"));
    let first = crate::support::one_run_id(starts).await;
    let recorded = registry.runs_by_module("hello").await.unwrap();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let held = registry.run_by_key("order-17").await.unwrap().unwrap();
    assert_eq!(held.run_id, first);
    crate::support::wait_for_end(&registry, &first).await;
    // Once finished it is still the key's run.
    let again = runner
        .start_idempotent("hello", ada.clone(), "order-17")
        .await
        .unwrap();
    assert_eq!(again, first);

    let other = runner
        .start_idempotent("hello", json!({"name": "Grace"}), "order-17")
        .await
        .unwrap_err();
    assert!(
        matches!(&other, Error::IdempotencyKeyReused { run_id, .. } if *run_id == first),
        "{other:?}"
    );
    for bad in ["", "line\nbreak", &"k".repeat(256)] {
        let refused = runner.start_idempotent("hello", ada.clone(), bad).await;
        assert!(
            matches!(refused, Err(Error::InvalidIdempotencyKey(_))),
            "{bad:?}: {refused:?}"
        );
    }
    assert_eq!(registry.runs_by_module("hello").await.unwrap().len(), 1);

    // Removed with its run, the key starts a new one.
    assert_eq!(registry.cleanup_old_runs(Duration::ZERO).await.unwrap(), 1);
    let fresh = runner
        .start_idempotent("hello", ada, "order-17")
        .await
        .unwrap();
    assert_ne!(fresh, first);
    crate::support::wait_for_end(&registry, &fresh).await;
}

/// A queued run of `module` started on `version`.
fn queued(module: &str, version: &str) -> Run {
    let mut run = Run::new(module, module);
    run.module_version = Some(version.to_owned());
    run
}

fn wanted(module: &str, version: &str, count: usize) -> modrun::registry::Wanted {
    modrun::registry::Wanted {
        module_id: module.to_owned(),
        version: version.to_owned(),
        count,
    }
}

fn ids(runs: &[Run]) -> Vec<&str> {
    runs.iter().map(|run| run.run_id.as_str()).collect()
}

async fn queued_runs_are_claimed_oldest_first_within_what_each_version_wants(
    store: &impl RunStore,
) {
    let first = [
        queued("hello", "sha256:one"),
        queued("hello", "sha256:one"),
        queued("hello", "sha256:one"),
    ];
    let newer = queued("hello", "sha256:two");
    let other = queued("other", "sha256:one");
    let cancelled = queued("other", "sha256:one");
    for run in first.iter().chain([&newer, &other, &cancelled]) {
        store.enqueue(run, 3, None).await.unwrap();
    }
    let cancel = Transition::cancelled(&cancelled.run_id, "changed my mind");
    assert!(
        store
            .transition(&cancel, modrun::registry::OnUnavailable::Refuse)
            .await
            .unwrap()
            .is_some()
    );
    let mut versions = store.queued_versions().await.unwrap();
    versions.sort();
    assert_eq!(
        versions,
        ["hello@sha256:one", "hello@sha256:two", "other@sha256:one"]
    );

    assert!(store.claim(&[], 10).await.unwrap().is_empty());
    assert!(
        store
            .claim(&[wanted("hello", "sha256:one", 5)], 0)
            .await
            .unwrap()
            .is_empty()
    );
    let claimed = store
        .claim(
            &[
                wanted("hello", "sha256:one", 2),
                wanted("other", "sha256:one", 5),
            ],
            10,
        )
        .await
        .unwrap();
    let mut expected = vec![
        first[0].run_id.as_str(),
        first[1].run_id.as_str(),
        other.run_id.as_str(),
    ];
    let mut got = ids(&claimed);
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected, "a cancelled run is never claimed");
    for run in &claimed {
        assert_eq!(run.status, RunStatus::Running);
        assert_eq!(run.attempt, Some(1));
        assert!(run.started_at.is_some());
    }
    let held = store.claimed().await.unwrap();
    for run in &claimed {
        assert!(held.contains(&run.run_id), "{held:?}");
    }
    assert!(!held.contains(&first[2].run_id), "still queued for anyone");

    // The limit caps the claim; the oldest is taken first.
    let rest = store
        .claim(&[wanted("hello", "sha256:one", 5)], 1)
        .await
        .unwrap();
    assert_eq!(ids(&rest), [first[2].run_id.as_str()]);
    let stored = store.get(&newer.run_id).await.unwrap().unwrap();
    assert_eq!(
        stored.status,
        RunStatus::Queued,
        "nobody wanted that version"
    );
    assert_eq!(store.queued_versions().await.unwrap(), ["hello@sha256:two"]);
}

async fn queued_runs_are_claimed_by_priority_then_as_they_became_due(store: &impl RunStore) {
    let now = chrono::Utc::now();
    let ago = |seconds| now - chrono::TimeDelta::seconds(seconds);
    let with = |priority: i16, created: i64, not_before: Option<i64>| {
        let mut run = queued("hello", "sha256:one").with_priority(priority);
        run.created_at = ago(created);
        run.not_before = not_before.map(ago);
        run
    };
    // Queued in this order; claimed higher priority first, then by when
    // each became due (its not-before time, or its creation).
    let high = with(5, 30, None);
    let due_late = with(0, 20, Some(2));
    let later_high = with(5, 10, None);
    let due_early = with(0, 8, None);
    let background = with(-3, 40, None);
    let low = with(0, 1, None);
    let not_yet = queued("hello", "sha256:one")
        .with_priority(i16::MAX)
        .with_not_before(now + chrono::TimeDelta::hours(1));
    for run in [
        &high,
        &due_late,
        &later_high,
        &due_early,
        &background,
        &low,
        &not_yet,
    ] {
        store.enqueue(run, 1, None).await.unwrap();
    }
    let stored = store.get(&not_yet.run_id).await.unwrap().unwrap();
    assert_eq!(stored.priority, i16::MAX);
    assert_eq!(stored.not_before, not_yet.not_before);
    let want = [wanted("hello", "sha256:one", 10)];
    let two = store.claim(&want, 2).await.unwrap();
    assert_eq!(
        ids(&two),
        [high.run_id.as_str(), later_high.run_id.as_str()]
    );
    assert_eq!(two[0].priority, 5);
    let mut order = Vec::new();
    for _ in 0..4 {
        let one = store.claim(&want, 1).await.unwrap();
        assert_eq!(one.len(), 1, "one due run left at least");
        order.push(one[0].run_id.clone());
    }
    assert_eq!(
        order,
        [&due_early, &due_late, &low, &background].map(|run| run.run_id.clone())
    );
    assert!(
        store.claim(&want, 10).await.unwrap().is_empty(),
        "a run not due yet is not claimed, whatever its priority"
    );
    let stored = store.get(&not_yet.run_id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Queued);
}

async fn a_run_given_back_is_claimed_again_as_its_next_attempt(store: &impl RunStore) {
    let run = queued("hello", "sha256:one");
    store.enqueue(&run, 3, None).await.unwrap();
    let want = [wanted("hello", "sha256:one", 1)];
    assert_eq!(
        ids(&store.claim(&want, 1).await.unwrap()),
        [run.run_id.as_str()]
    );

    let released = store
        .release(&[run.run_id.clone(), "no-such-run".into()], "given back")
        .await
        .unwrap();
    assert_eq!(released, [(run.run_id.clone(), "hello".to_owned())]);
    let back = store.get(&run.run_id).await.unwrap().unwrap();
    assert_eq!(back.status, RunStatus::Queued);
    assert_eq!(back.started_at, None);
    let history = store.history(&run.run_id).await.unwrap();
    let statuses: Vec<RunStatus> = history.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Queued]
    );
    assert_eq!(history[2].message.as_deref(), Some("given back"));

    let again = store.claim(&want, 1).await.unwrap();
    assert_eq!(ids(&again), [run.run_id.as_str()]);
    assert_eq!(again[0].attempt, Some(2));
    // A finished run is not given back.
    let done = Transition::completed(&run.run_id, json!("done"));
    store
        .transition(&done, modrun::registry::OnUnavailable::Refuse)
        .await
        .unwrap();
    assert!(
        store
            .release(std::slice::from_ref(&run.run_id), "too late")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.get(&run.run_id).await.unwrap().unwrap().status,
        RunStatus::Completed
    );
}

async fn a_run_claimed_as_it_is_queued_has_both_entries_and_its_first_attempt(
    store: &impl RunStore,
) {
    let mut run = queued("hello", "sha256:one");
    run.status = RunStatus::Running;
    run.started_at = Some(run.created_at + chrono::Duration::milliseconds(1));
    run.attempt = Some(1);
    store.enqueue(&run, 3, None).await.unwrap();
    let stored = store.get(&run.run_id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Running);
    assert_eq!(stored.attempt, Some(1));
    let statuses: Vec<RunStatus> = store
        .history(&run.run_id)
        .await
        .unwrap()
        .iter()
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses, [RunStatus::Queued, RunStatus::Running]);
    assert!(store.queued_versions().await.unwrap().is_empty());
    assert!(store.claimed().await.unwrap().contains(&run.run_id));
    assert!(
        store
            .claim(&[wanted("hello", "sha256:one", 5)], 5)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A task manager records a run it starts at once queued and running in
/// one write: over a run its caller added `Queued` first (the guide's
/// way), or one resumed from its record, that write takes the record
/// over and keeps its history; a finished run with the id is replaced;
/// an active one is refused.
async fn a_run_claimed_as_it_is_recorded_takes_over_its_queued_record_or_a_finished_id(
    store: &impl RunStore,
) {
    let running = |run: &Run| {
        let mut run = run.clone();
        run.status = RunStatus::Running;
        run.started_at = Some(run.created_at + chrono::Duration::milliseconds(1));
        run.attempt = Some(1);
        run
    };
    let statuses = |run_id: String| async move {
        let history = store.history(&run_id).await.unwrap();
        history.iter().map(|c| c.status).collect::<Vec<_>>()
    };
    use modrun::registry::Existing;

    // Added queued by its caller, then started: one record, two entries.
    let added = queued("hello", "sha256:one").with_parameters(json!({"n": 1}));
    store
        .insert(&added, Existing::ReplaceFinished, None)
        .await
        .unwrap();
    store.enqueue(&running(&added), 1, None).await.unwrap();
    let stored = store.get(&added.run_id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Running);
    assert_eq!(stored.parameters, added.parameters);
    assert_eq!(stored.started_at, running(&added).started_at);
    assert_eq!(stored.attempt, Some(1));
    assert_eq!(
        statuses(added.run_id.clone()).await,
        [RunStatus::Queued, RunStatus::Running]
    );
    assert!(store.claimed().await.unwrap().contains(&added.run_id));

    // Running now: starting it again is refused, and changes nothing.
    let again = store.enqueue(&running(&added), 1, None).await;
    assert!(
        matches!(
            again,
            Err(Error::RunActive {
                status: RunStatus::Running,
                ..
            })
        ),
        "{again:?}"
    );
    // Queued for any process, an id taken is never taken over.
    let taken = store.enqueue(&added, 1, None).await;
    assert!(matches!(taken, Err(Error::RunActive { .. })), "{taken:?}");
    assert_eq!(
        statuses(added.run_id.clone()).await,
        [RunStatus::Queued, RunStatus::Running]
    );

    // Queued for any claimer, then started here: taken over, and no
    // claim takes it again.
    let shared = queued("hello", "sha256:one");
    store.enqueue(&shared, 1, None).await.unwrap();
    store.enqueue(&running(&shared), 1, None).await.unwrap();
    assert_eq!(
        statuses(shared.run_id.clone()).await,
        [RunStatus::Queued, RunStatus::Running]
    );
    assert!(store.claimed().await.unwrap().contains(&shared.run_id));
    let want = [wanted("hello", "sha256:one", 5)];
    assert!(store.claim(&want, 5).await.unwrap().is_empty());
    assert!(store.queued_versions().await.unwrap().is_empty());

    // Finished: started again under its id, it is a fresh record.
    store
        .transition(
            &Transition::completed(&added.run_id, json!("done")),
            modrun::registry::OnUnavailable::Refuse,
        )
        .await
        .unwrap();
    let mut rerun = queued("hello", "sha256:one");
    rerun.run_id = added.run_id.clone();
    store.enqueue(&running(&rerun), 1, None).await.unwrap();
    let stored = store.get(&rerun.run_id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Running);
    assert_eq!(stored.output, None);
    assert_eq!(stored.created_at, rerun.created_at);
    assert_eq!(
        statuses(rerun.run_id.clone()).await,
        [RunStatus::Queued, RunStatus::Running]
    );
}

/// When a claimer should look again: the earliest not-before time still
/// to come of the runs queued for any claimer; not of runs due already,
/// claimed, or kept for one process.
async fn the_next_due_time_is_the_earliest_not_before_time_to_come_of_runs_any_claimer_may_take(
    store: &impl RunStore,
) {
    let now = chrono::Utc::now();
    let hours = |n: i64| now + chrono::TimeDelta::hours(n);
    assert_eq!(store.next_due(now).await.unwrap(), None);
    let mut due = Vec::new();
    for at in [Some(hours(2)), None, Some(hours(1)), Some(hours(-1))] {
        let mut run = queued("hello", "sha256:one");
        run.not_before = at;
        store.enqueue(&run, 1, None).await.unwrap();
        due.push(store.get(&run.run_id).await.unwrap().unwrap().not_before);
    }
    // Earlier, but not for any claimer: kept for this process, or running.
    let mut kept =
        queued("hello", "sha256:one").with_not_before(now + chrono::TimeDelta::minutes(5));
    store
        .insert(&kept, modrun::registry::Existing::ReplaceFinished, None)
        .await
        .unwrap();
    kept.run_id = uuid::Uuid::now_v7().to_string();
    kept.status = RunStatus::Running;
    kept.started_at = Some(now);
    store.enqueue(&kept, 1, None).await.unwrap();

    let (in_two, in_one) = (due[0], due[2]);
    assert!(in_one.is_some() && in_two.is_some());
    assert_eq!(store.next_due(now).await.unwrap(), in_one);
    assert_eq!(store.next_due(in_one.unwrap()).await.unwrap(), in_two);
    assert_eq!(store.next_due(in_two.unwrap()).await.unwrap(), None);
}
