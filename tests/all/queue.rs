use std::time::Duration;

use chrono::Utc;
use modrun::cluster::Claimer;
use modrun::registry::{PostgresOptions, PostgresStore, Wanted};
use modrun::{
    BackgroundTaskManager, ModuleHost, ModuleRunner, Run, RunHandle, RunRegistry, RunStatus,
    RunStore, StartOptions, TaskLimits,
};
use serde_json::json;

use crate::support::{
    database_url, fresh_schema, plugins_dir, statuses, test_host_config, wait_for_end,
    wait_for_status, wait_until,
};

/// A store for node `node` with the product's own lease (30 s): long
/// enough that no node is lost while a test runs, however loaded the
/// machine.
async fn store(url: &str, schema: &str, node: &str) -> PostgresStore {
    store_leased(url, schema, node, Duration::from_secs(30)).await
}

/// [`store`] with a lease of `lease`: a short one for a node the test
/// loses on purpose.
async fn store_leased(url: &str, schema: &str, node: &str, lease: Duration) -> PostgresStore {
    let options = PostgresOptions {
        schema: schema.to_owned(),
        node: node.to_owned(),
        lease,
        ..PostgresOptions::default()
    };
    PostgresStore::connect(url, options).await.unwrap()
}

/// A session of the test server's that reads and writes `schema`'s
/// tables directly, as another program could.
async fn sql_in(url: &str, schema: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await
        .unwrap();
    client
}

/// A node: a runner over `dir`'s plugins on the shared schema, with
/// `max_concurrent` slots; claiming only once asked to.
async fn node(
    url: &str,
    schema: &str,
    name: &str,
    dir: &std::path::Path,
    max_concurrent: usize,
) -> ModuleRunner {
    let registry = RunRegistry::new(store(url, schema, name).await);
    let host = ModuleHost::new(test_host_config()).unwrap();
    host.load_dir(dir).await.unwrap();
    let limits = TaskLimits {
        max_concurrent: Some(max_concurrent),
        max_queued: Some(1000),
    };
    ModuleRunner::new(host, BackgroundTaskManager::with_limits(registry, limits))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_runs_are_running_for_their_node_and_can_be_given_back() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let store = store(&url, &schema, "claimer").await;
    let mut queued = Vec::new();
    for index in 0..5 {
        let mut run = Run::new("hello", "Hello");
        run.module_version = Some(if index < 4 { "v1" } else { "v2" }.to_owned());
        store.enqueue(&run, 1, None).await.unwrap();
        queued.push(run);
    }
    let wanted = |version: &str, count| Wanted {
        module_id: "hello".into(),
        version: version.into(),
        count,
    };
    // Of v1 at most 3, of v2 any, 3 in all: the oldest three of v1.
    let claimed = store
        .claim(&[wanted("v1", 3), wanted("v2", 5)], 3)
        .await
        .unwrap();
    let ids: Vec<&str> = claimed.iter().map(|run| run.run_id.as_str()).collect();
    let oldest: Vec<&str> = queued[..3].iter().map(|run| run.run_id.as_str()).collect();
    assert_eq!(ids, oldest);
    for run in &claimed {
        assert_eq!(run.status, RunStatus::Running);
        assert_eq!(run.node.as_deref(), Some("claimer"));
        assert!(run.started_at.is_some());
    }
    // Claimed runs are nobody else's.
    let again = store.claim(&[wanted("v1", 10)], 10).await.unwrap();
    assert_eq!(again.len(), 1, "only the fourth v1 run was left");
    let mut held = store.claimed().await.unwrap();
    held.sort();
    let mut expected: Vec<String> = queued[..4].iter().map(|r| r.run_id.clone()).collect();
    expected.sort();
    assert_eq!(held, expected);

    // Given back: queued again, for any node.
    let released = store.release(&held[..1], "given back").await.unwrap();
    assert_eq!(released, [(held[0].clone(), "hello".to_owned())]);
    let registry = RunRegistry::new(store);
    let run = registry.get_run(&held[0]).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.node, None);
    assert_eq!(
        statuses(&registry, &held[0]).await,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Queued]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reads_no_oversized_value_another_node_wrote() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let store = store(&url, &schema, "claimer").await;
    let client = sql_in(&url, &schema).await;
    let mut huge = Run::new("hello", "Hello");
    huge.module_version = Some("v1".into());
    store.enqueue(&huge, 1, None).await.unwrap();
    let mut retried = Run::new("hello", "Hello");
    retried.module_version = Some("v1".into());
    store.enqueue(&retried, 1, None).await.unwrap();
    // Parameters over the bound, which no node writes; and large leavings
    // of an earlier attempt, which a claim need not read.
    let over = i32::try_from(modrun::run::MAX_PARAMETERS_BYTES).unwrap() + 1;
    client
        .execute(
            "UPDATE runs SET parameters = '{\"x\":\"' || repeat('a', $2 - 8) || '\"}' \
             WHERE run_id = $1",
            &[&huge.run_id, &over],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE runs SET output = repeat('b', 10000000), log = repeat('c', 10000000), \
             error_message = repeat('d', 10000000), progress_fraction = 0.5, \
             progress_message = repeat('e', 10000000), module_name = repeat('f', 10000000) \
             WHERE run_id = $1",
            &[&retried.run_id],
        )
        .await
        .unwrap();

    let wanted = Wanted {
        module_id: "hello".into(),
        version: "v1".into(),
        count: 10,
    };
    let claimed = store.claim(&[wanted], 10).await.unwrap();
    assert_eq!(
        claimed.len(),
        1,
        "the run with huge parameters is not answered"
    );
    let run = &claimed[0];
    assert_eq!(run.run_id, retried.run_id);
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.module_name.len(), 1000, "a module name is read cut");
    assert_eq!(
        (
            &run.output,
            run.log.len(),
            &run.error_message,
            &run.progress
        ),
        (&None, 0, &None, &None),
        "an earlier attempt's leavings are not read"
    );

    let registry = RunRegistry::new(store);
    let failed = registry.get_run(&huge.run_id).await.unwrap().unwrap();
    assert_eq!(failed.status, RunStatus::Failed);
    assert_eq!(failed.exit_code, Some(modrun::run::EXIT_FAILURE));
    assert_eq!(failed.started_at, None, "it never started");
    let message = failed.error_message.unwrap();
    assert_eq!(
        message,
        format!(
            "its parameters are {over} bytes of JSON, more than the {} a run takes: \
             no node reads them",
            modrun::run::MAX_PARAMETERS_BYTES
        )
    );
    let history = registry.history(&huge.run_id).await.unwrap();
    assert_eq!(
        history
            .iter()
            .map(|change| (change.status, change.message.as_deref()))
            .collect::<Vec<_>>(),
        [
            (RunStatus::Queued, None),
            (RunStatus::Failed, Some(message.as_str()))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fetches_no_module_version_over_its_size_limit() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let store = store(&url, &schema, "fetcher").await;
    sql_in(&url, &schema)
        .await
        .execute(
            "INSERT INTO module_versions (hash, module_id, bytes, stored_at) \
             VALUES ('sha256:big', 'hello', decode(repeat('00', 5000), 'hex'), 0)",
            &[],
        )
        .await
        .unwrap();
    let (module, bytes) = store
        .module_bytes("sha256:big", 5000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((module.as_str(), bytes.len()), ("hello", 5000));
    let refused = store.module_bytes("sha256:big", 4999).await.unwrap_err();
    assert!(
        refused.to_string().contains(
            "the component stored for module version sha256:big is 5000 bytes, more than the \
             4999 a module may have: it was not read"
        ),
        "{refused}"
    );
    assert!(
        store
            .module_bytes("sha256:none", 10)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_run_no_live_node_can_run_is_failed_saying_why() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let store = store(&url, &schema, "only").await;
    let mut stale = Run::new("hello", "Hello");
    stale.module_version = Some("sha256:gone".into());
    stale.created_at = Utc::now() - chrono::Duration::seconds(30);
    store.enqueue(&stale, 1, None).await.unwrap();
    let mut fresh = Run::new("hello", "Hello");
    fresh.module_version = Some("sha256:gone".into());
    store.enqueue(&fresh, 1, None).await.unwrap();
    let mut runnable = Run::new("hello", "Hello");
    runnable.module_version = Some("sha256:here".into());
    runnable.created_at = stale.created_at;
    store.enqueue(&runnable, 1, None).await.unwrap();
    // Until the node says what it can run, nothing is settled.
    store.publish_versions(vec!["hello@sha256:here".into()]);
    let registry = RunRegistry::new(store);

    let failed = wait_for_end(&registry, &stale.run_id).await;
    assert_eq!(failed.status, RunStatus::Failed);
    let message = failed.error_message.unwrap();
    assert!(
        message.contains("no node can run it: module hello at version sha256:gone"),
        "{message}"
    );
    // A run some live node can run waits, and so does a run queued just
    // now (a node that loaded its version may not have said so yet).
    for run in [&fresh, &runnable] {
        let run = registry.get_run(&run.run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Queued);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_limit_is_applied_at_claim_and_starves_no_other_module() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let dir = plugins_dir(&["countdown", "hello"]);
    std::fs::write(
        dir.path().join("countdown.toml"),
        "[limits]\nmax_concurrent = 4\n",
    )
    .unwrap();
    let runner = node(&url, &schema, "a", dir.path(), 64).await;
    let claimer = runner.claim_from_queue().unwrap();
    let mut countdowns = Vec::new();
    for _ in 0..64 {
        countdowns.push(
            runner
                .start("countdown", json!({"seconds": 60, "step_ms": 10}))
                .await
                .unwrap(),
        );
    }
    for run_id in &countdowns[..4] {
        wait_for_status(runner.registry(), run_id, RunStatus::Running).await;
    }
    // 60 slots are still free: another module runs at once. (Awaited
    // through its handle: that returns once its task is gone too, which
    // the count of active tasks below relies on.)
    let hello = runner
        .start("hello", json!({"name": "Ada"}))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(
        hello.status,
        RunStatus::Completed,
        "{:?}",
        hello.error_message
    );
    assert_eq!(hello.node.as_deref(), Some("a"));
    for run_id in &countdowns[4..] {
        let run = runner.registry().get_run(run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Queued, "the module's limit holds");
    }
    assert_eq!(runner.manager().active_task_count(), 4);

    // Freeing one of the module's places claims the next in line.
    assert!(runner.cancel(&countdowns[0]).await.unwrap());
    wait_for_status(runner.registry(), &countdowns[4], RunStatus::Running).await;
    // A run still queued is cancelled in the queue, by whoever asks.
    assert!(runner.cancel(&countdowns[63]).await.unwrap());
    let cancelled = runner
        .registry()
        .get_run(&countdowns[63])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert_eq!(
        statuses(runner.registry(), &countdowns[63]).await,
        [RunStatus::Queued, RunStatus::Cancelled]
    );
    claimer.stop().await;
    runner
        .manager()
        .shutdown(Duration::from_millis(10))
        .await
        .unwrap();
}

/// A countdown that runs for a minute unless cancelled.
static LONG_COUNTDOWN: std::sync::LazyLock<serde_json::Value> =
    std::sync::LazyLock::new(|| json!({"seconds": 60, "step_ms": 10}));

/// Node "a" over countdown (one run at a time: its manifest's limit) and
/// hello, claiming, with a [`LONG_COUNTDOWN`] in countdown's one place.
async fn one_place_taken(
    url: &str,
    schema: &str,
) -> (tempfile::TempDir, ModuleRunner, Claimer, RunHandle) {
    let dir = plugins_dir(&["countdown", "hello"]);
    std::fs::write(
        dir.path().join("countdown.toml"),
        "[limits]\nmax_concurrent = 1\n",
    )
    .unwrap();
    let a = node(url, schema, "a", dir.path(), 4).await;
    let claimer = a.claim_from_queue().unwrap();
    let first = a.start("countdown", LONG_COUNTDOWN.clone()).await.unwrap();
    wait_for_status(a.registry(), &first, RunStatus::Running).await;
    (dir, a, claimer, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_with_room_never_overtakes_a_run_queued_before_it() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let (dir, a, claimer, first) = one_place_taken(&url, &schema).await;
    let long = LONG_COUNTDOWN.clone();
    let second = a.start("countdown", long.clone()).await.unwrap();
    let queued = a.registry().get_run(&second).await.unwrap().unwrap();
    assert_eq!(
        queued.status,
        RunStatus::Queued,
        "the module's one place is taken"
    );

    // With the claimer held still, the module's place frees while the
    // second run waits in the queue: a third start finds room, and queues
    // behind it all the same.
    claimer.stop().await;
    assert!(a.cancel(&first).await.unwrap());
    wait_for_status(a.registry(), &first, RunStatus::Cancelled).await;
    wait_until("the cancelled run's end", || {
        a.manager().active_task_count() == 0
    })
    .await;
    let third = a.start("countdown", long).await.unwrap();
    let run = a.registry().get_run(&third).await.unwrap().unwrap();
    assert_eq!(
        run.status,
        RunStatus::Queued,
        "it would overtake the second run"
    );
    // A run of another module overtakes none: it starts at once.
    let hello = a.start("hello", json!({"name": "Ada"})).await.unwrap();
    let hello = wait_for_end(a.registry(), &hello).await;
    assert_eq!(hello.status, RunStatus::Completed);

    // Whoever claims next takes them in the order they were started.
    let b = node(&url, &schema, "b", dir.path(), 4).await;
    let b_claimer = b.claim_from_queue().unwrap();
    let running = wait_for_status(b.registry(), &second, RunStatus::Running).await;
    assert_eq!(running.node.as_deref(), Some("b"));
    let run = b.registry().get_run(&third).await.unwrap().unwrap();
    assert_eq!(
        run.status,
        RunStatus::Queued,
        "the module's one place is taken"
    );
    b_claimer.stop().await;
    for node in [a, b] {
        node.manager()
            .shutdown(Duration::from_millis(10))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_run_is_claimed_before_earlier_ones_and_a_run_not_due_waits() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let (_dir, a, claimer, first) = one_place_taken(&url, &schema).await;
    let long = LONG_COUNTDOWN.clone();
    let start = |priority: i16, not_before: Option<chrono::DateTime<Utc>>| {
        let mut options = StartOptions::new().priority(priority);
        if let Some(at) = not_before {
            options = options.not_before(at);
        }
        let (a, long) = (a.clone(), long.clone());
        async move { a.start_with("countdown", long, &options).await.unwrap() }
    };
    let early = start(0, None).await;
    let far_off = start(i16::MAX, Some(Utc::now() + chrono::TimeDelta::hours(1))).await;
    let urgent = start(5, None).await;
    for run_id in [&early, &far_off, &urgent] {
        let run = a.registry().get_run(run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Queued);
    }

    // The module's place frees: the urgent run goes first, then the
    // earlier one; the run not due yet waits, whatever its priority.
    // (A claimed run is recorded `Running` before its task starts here:
    // it is cancelled here once its task runs.)
    let running_here = |run_id: String| {
        let a = a.clone();
        async move {
            wait_for_status(a.registry(), &run_id, RunStatus::Running).await;
            wait_until("the claimed run's task", || {
                a.manager().is_task_active(&run_id)
            })
            .await;
        }
    };
    assert!(a.cancel(&first).await.unwrap());
    running_here(urgent.id().to_owned()).await;
    let run = a.registry().get_run(&early).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Queued, "the urgent run went first");
    assert!(a.cancel(&urgent).await.unwrap());
    running_here(early.id().to_owned()).await;
    assert!(a.cancel(&early).await.unwrap());
    let run = a.registry().get_run(&far_off).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Queued, "not due for an hour");
    assert!(a.cancel(&far_off).await.unwrap());

    // A run due soon is queued, not started at once, and starts in time.
    let at = Utc::now() + chrono::TimeDelta::milliseconds(500);
    let options = StartOptions::new().not_before(at);
    let soon = a
        .start_with("hello", json!({"name": "Ada"}), &options)
        .await
        .unwrap();
    let run = a.registry().get_run(&soon).await.unwrap().unwrap();
    assert_eq!(
        run.status,
        RunStatus::Queued,
        "there is room, but it is not due"
    );
    let run = wait_for_end(a.registry(), &soon).await;
    assert_eq!(run.status, RunStatus::Completed, "{:?}", run.error_message);
    let started = run.started_at.unwrap();
    assert!(started >= at, "started {started}, not before {at}");
    claimer.stop().await;
    a.manager()
        .shutdown(Duration::from_millis(10))
        .await
        .unwrap();
}

/// A run queued for later starts when it is due, not at a claimer's next
/// poll (a second apart): the node that queued it wakes for it, and so
/// does every other node, told by the database. Four runs, due at
/// different times, each started within 400 ms of its time: with claims
/// at each poll only, all four would be that prompt about one time in 40.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_queued_for_later_start_when_due_on_the_node_that_queued_them_or_another() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let dir = plugins_dir(&["countdown", "hello"]);
    let a = node(&url, &schema, "a", dir.path(), 1).await;
    let b = node(&url, &schema, "b", dir.path(), 4).await;
    let a_claimer = a.claim_from_queue().unwrap();
    // Node a's one place is taken (before b claims: a start a queues
    // could otherwise be b's): b runs every run, those a queued too.
    let long = a.start("countdown", LONG_COUNTDOWN.clone()).await.unwrap();
    let running = wait_for_status(a.registry(), &long, RunStatus::Running).await;
    assert_eq!(running.node.as_deref(), Some("a"));
    let b_claimer = b.claim_from_queue().unwrap();

    let mut later = Vec::new();
    for (node, ms) in [(&a, 700), (&b, 1200), (&a, 1700), (&b, 2300)] {
        let at = Utc::now() + chrono::TimeDelta::milliseconds(ms);
        let options = StartOptions::new().not_before(at);
        let handle = node
            .start_with("hello", json!({"name": "later"}), &options)
            .await
            .unwrap();
        later.push((handle.id().to_owned(), at));
    }
    for (run_id, at) in later {
        let run = wait_for_end(a.registry(), &run_id).await;
        assert_eq!(run.status, RunStatus::Completed, "{:?}", run.error_message);
        assert_eq!(run.node.as_deref(), Some("b"));
        let late = run.started_at.unwrap() - at;
        assert!(
            late >= chrono::TimeDelta::zero() && late < chrono::TimeDelta::milliseconds(400),
            "run {run_id} started {} ms after its not-before time",
            late.num_milliseconds()
        );
    }

    assert!(a.cancel(&long).await.unwrap());
    a_claimer.stop().await;
    b_claimer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_started_on_a_busy_node_runs_on_one_with_room() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let dir = plugins_dir(&["countdown", "hello"]);
    let busy = node(&url, &schema, "busy", dir.path(), 1).await;
    let idle = node(&url, &schema, "idle", dir.path(), 4).await;
    let busy_claimer = busy.claim_from_queue().unwrap();
    let long = busy
        .start("countdown", json!({"seconds": 60, "step_ms": 10}))
        .await
        .unwrap();
    let running = wait_for_status(busy.registry(), &long, RunStatus::Running).await;
    assert_eq!(running.node.as_deref(), Some("busy"));

    // The busy node has no room: the idle one takes what it starts.
    let idle_claimer = idle.claim_from_queue().unwrap();
    let hello = busy.start("hello", json!({"name": "B"})).await.unwrap();
    let hello = wait_for_end(busy.registry(), &hello).await;
    assert_eq!(
        hello.status,
        RunStatus::Completed,
        "{:?}",
        hello.error_message
    );
    assert_eq!(hello.node.as_deref(), Some("idle"));
    assert_eq!(hello.output, Some(json!({"greeting": "Hello, B!"})));

    assert!(busy.cancel(&long).await.unwrap());
    busy_claimer.stop().await;
    idle_claimer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nodes_run_that_may_retry_is_queued_again_and_its_late_end_refused() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let lost = store_leased(&url, &schema, "lost", Duration::from_secs(2)).await;
    // Claimed by "lost" as it was recorded, with three attempts allowed.
    let mut run = Run::new("countdown", "Countdown");
    run.module_version = Some("v1".into());
    run.status = RunStatus::Running;
    run.started_at = Some(Utc::now());
    lost.enqueue(&run, 3, None).await.unwrap();
    let once = Run::new("countdown", "Countdown");
    let mut once = Run {
        module_version: Some("v1".into()),
        status: RunStatus::Running,
        started_at: Some(Utc::now()),
        ..once
    };
    once.attempt = None;
    lost.enqueue(&once, 1, None).await.unwrap();
    drop(lost);

    // Its lease runs out: the run that may retry is queued again, for any
    // node; the other fails.
    let survivor = RunRegistry::new(store(&url, &schema, "survivor").await);
    let queued_again = wait_for_status(&survivor, &run.run_id, RunStatus::Queued).await;
    assert_eq!(queued_again.node, None);
    let failed = wait_for_end(&survivor, &once.run_id).await;
    assert_eq!(failed.status, RunStatus::Failed);
    let history = survivor.history(&run.run_id).await.unwrap();
    let message = history[2].message.as_deref().unwrap();
    assert!(
        message.starts_with("node lost: lost stopped renewing its lease")
            && message.ends_with("queued again (attempt 2 of 3)"),
        "{message}"
    );

    // Claimed again, by another node: attempt 2.
    let claimer = store(&url, &schema, "claimer").await;
    let wanted = Wanted {
        module_id: "countdown".into(),
        version: "v1".into(),
        count: 1,
    };
    let claimed = claimer.claim(&[wanted], 1).await.unwrap();
    assert_eq!(claimed[0].attempt, Some(2));
    assert_eq!(claimed[0].node.as_deref(), Some("claimer"));

    // The lost node comes back and reports its attempt's end: refused.
    let late = RunRegistry::new(store(&url, &schema, "lost").await);
    let mut end = modrun::Transition::completed(&run.run_id, json!("stale"));
    end.attempt = Some(1);
    assert!(!late.hold_transition(&end).await.unwrap());
    // The claimer's own attempt ends as it reports.
    let claimer = RunRegistry::new(claimer);
    let mut end = modrun::Transition::completed(&run.run_id, json!("fresh"));
    end.attempt = Some(2);
    assert!(claimer.hold_transition(&end).await.unwrap());
    let run = claimer.get_run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(run.output, Some(json!("fresh")));
    assert_eq!(
        statuses(&claimer, &run.run_id).await,
        [
            RunStatus::Queued,
            RunStatus::Running,
            RunStatus::Queued,
            RunStatus::Running,
            RunStatus::Completed
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_in_its_heartbeat_holds_up_no_other_node() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let lost = store_leased(&url, &schema, "lost", Duration::from_secs(2)).await;
    let mut run = Run::new("countdown", "Countdown");
    run.module_version = Some("v1".into());
    run.status = RunStatus::Running;
    run.started_at = Some(Utc::now());
    lost.enqueue(&run, 1, None).await.unwrap();
    drop(lost);
    // The lost node froze in the middle of a heartbeat: its transaction
    // holds its node row, and stays open.
    let (frozen, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    frozen
        .batch_execute(&format!(
            "SET search_path TO {schema}; BEGIN; \
             SELECT 1 FROM nodes WHERE node_id = 'lost' FOR UPDATE"
        ))
        .await
        .unwrap();

    // Another node's heartbeats go on: they renew its lease, and settle
    // the lost node's run once its lease is out.
    let survivor = RunRegistry::new(store(&url, &schema, "survivor").await);
    let failed = wait_for_end(&survivor, &run.run_id).await;
    assert_eq!(failed.status, RunStatus::Failed);
    let message = failed.error_message.unwrap();
    assert!(
        message.starts_with("node lost: lost stopped renewing its lease"),
        "{message}"
    );
    frozen.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_retried_on_two_nodes_with_one_key_is_one_run() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let dir = plugins_dir(&["hello"]);
    let a = node(&url, &schema, "a", dir.path(), 4).await;
    let b = node(&url, &schema, "b", dir.path(), 4).await;
    let (a_claimer, b_claimer) = (a.claim_from_queue().unwrap(), b.claim_from_queue().unwrap());
    let parameters = json!({"name": "Ada"});
    // A client retrying through a load balancer: its starts land on both
    // nodes at once.
    let starts = (0..10).map(|i| {
        let (runner, parameters) = (if i % 2 == 0 { &a } else { &b }, parameters.clone());
        async move {
            runner
                .start_idempotent("hello", parameters, "checkout-42")
                .await
        }
    });
    let run_id = crate::support::one_run_id(starts).await;
    let run = wait_for_end(a.registry(), &run_id).await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(a.registry().runs_by_module("hello").await.unwrap().len(), 1);
    a_claimer.stop().await;
    b_claimer.stop().await;
}

/// Makes `dir`'s `hello.wasm` another version of the same module: the same
/// code, with a custom section that changes its content hash.
fn another_version_of_hello(dir: &std::path::Path) {
    let file = dir.join("hello.wasm");
    let mut bytes = std::fs::read(&file).unwrap();
    let (name, payload) = (b"modrun-test", b"another version");
    let size = 1 + name.len() + payload.len();
    assert!(size < 128, "one LEB128 byte");
    bytes.extend([0u8, size as u8, name.len() as u8]);
    bytes.extend(name);
    bytes.extend(payload);
    std::fs::write(&file, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_pinned_to_a_version_only_its_node_loaded_runs_on_another_node() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let old = plugins_dir(&["countdown", "hello"]);
    another_version_of_hello(old.path());
    let new = plugins_dir(&["countdown", "hello"]);
    let a = node(&url, &schema, "a", old.path(), 1).await;
    let b = node(&url, &schema, "b", new.path(), 4).await;
    let pinned = a.host().module("hello").unwrap().content_hash;
    assert_ne!(pinned, b.host().module("hello").unwrap().content_hash);
    let a_claimer = a.claim_from_queue().unwrap();
    // A's one slot is taken: what it starts next waits for any node.
    let long = a
        .start("countdown", json!({"seconds": 60, "step_ms": 10}))
        .await
        .unwrap();
    wait_for_status(a.registry(), &long, RunStatus::Running).await;
    let hello = a.start("hello", json!({"name": "Ada"})).await.unwrap();

    // B never loaded that version: it fetches it from the database.
    let b_claimer = b.claim_from_queue().unwrap();
    let hello = wait_for_end(b.registry(), &hello).await;
    assert_eq!(
        hello.status,
        RunStatus::Completed,
        "{:?}",
        hello.error_message
    );
    assert_eq!(hello.node.as_deref(), Some("b"));
    assert_eq!(hello.module_version.as_deref(), Some(pinned.as_str()));
    assert_eq!(hello.output, Some(json!({"greeting": "Hello, Ada!"})));

    // Bytes stored under a hash they do not have are never run.
    let forged = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let genuine = std::fs::read(new.path().join("hello.wasm")).unwrap();
    let store = store(&url, &schema, "forger").await;
    store.store_module("hello", forged, &genuine).await.unwrap();
    let mut run = Run::new("hello", "Hello");
    run.module_version = Some(forged.to_owned());
    // Queued longer than a lease ago: every node has said what it runs.
    run.created_at = Utc::now() - chrono::Duration::seconds(60);
    store.enqueue(&run, 1, None).await.unwrap();
    let refused = wait_for_end(b.registry(), &run.run_id).await;
    assert_eq!(refused.status, RunStatus::Failed);
    assert!(
        refused
            .error_message
            .as_deref()
            .unwrap()
            .contains("no node can run it"),
        "{refused:?}"
    );

    assert!(a.cancel(&long).await.unwrap());
    a_claimer.stop().await;
    b_claimer.stop().await;
}

/// Polls until `runner` runs version `hash` of hello, failing the test
/// after the deadline.
async fn wait_for_version(runner: &ModuleRunner, hash: &str) -> modrun::module::ModuleSummary {
    let start = std::time::Instant::now();
    loop {
        let hello = runner.host().module("hello").unwrap();
        if hello.content_hash == hash {
            return hello;
        }
        assert!(
            start.elapsed() < crate::support::DEADLINE,
            "hello stayed at {} rather than {hash} (last error: {:?})",
            hello.content_hash,
            hello.last_error
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sets the modification time of `dir`'s hello.wasm `seconds` from now.
fn modified_in(dir: &std::path::Path, seconds: i64) {
    let file = std::fs::File::options()
        .write(true)
        .open(dir.join("hello.wasm"))
        .unwrap();
    let now = std::time::SystemTime::now();
    let delta = Duration::from_secs(seconds.unsigned_abs());
    let at = if seconds < 0 {
        now - delta
    } else {
        now + delta
    };
    file.set_modified(at).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_on_one_node_is_run_by_every_node_and_an_older_file_does_not_win() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let a_dir = plugins_dir(&["countdown", "hello"]);
    let b_dir = plugins_dir(&["countdown", "hello"]);
    modified_in(a_dir.path(), -3600);
    modified_in(b_dir.path(), -3600);
    let a = node(&url, &schema, "a", a_dir.path(), 4).await;
    let b = node(&url, &schema, "b", b_dir.path(), 4).await;
    let first = a.host().module("hello").unwrap().content_hash;
    let a_claimer = a.claim_from_queue().unwrap();
    let b_claimer = b.claim_from_queue().unwrap();

    // A's file changes and A reloads it: B runs the new version too,
    // fetched from the database, under B's own manifest and path.
    another_version_of_hello(a_dir.path());
    let newer = a
        .host()
        .load_file(&a_dir.path().join("hello.wasm"))
        .await
        .unwrap()
        .content_hash;
    assert_ne!(newer, first);
    let on_b = wait_for_version(&b, &newer).await;
    assert_eq!(on_b.published_by.as_deref(), Some("a"));
    assert_eq!(on_b.path, b_dir.path().join("hello.wasm"));
    assert_eq!(a.host().module("hello").unwrap().published_by, None);
    let run = b.start("hello", json!({"name": "Ada"})).await.unwrap();
    let run = wait_for_end(b.registry(), &run).await;
    assert_eq!(run.status, RunStatus::Completed, "{:?}", run.error_message);
    assert_eq!(run.module_version.as_deref(), Some(newer.as_str()));
    assert_eq!(run.output, Some(json!({"greeting": "Hello, Ada!"})));

    // A node that joins with the older file (an older modification time)
    // follows the head rather than turning the cluster back.
    let c_dir = plugins_dir(&["countdown", "hello"]);
    modified_in(c_dir.path(), -7200);
    let c = node(&url, &schema, "c", c_dir.path(), 4).await;
    assert_eq!(c.host().module("hello").unwrap().content_hash, first);
    let c_claimer = c.claim_from_queue().unwrap();
    wait_for_version(&c, &newer).await;
    assert_eq!(a.host().module("hello").unwrap().content_hash, newer);

    // Writing the first version again on C (a newer file) makes it the head
    // everywhere, A included.
    modified_in(c_dir.path(), 0);
    c.host()
        .load_file(&c_dir.path().join("hello.wasm"))
        .await
        .unwrap();
    wait_for_version(&a, &first).await;
    wait_for_version(&b, &first).await;
    assert_eq!(
        a.host().module("hello").unwrap().published_by.as_deref(),
        Some("c")
    );

    a_claimer.stop().await;
    b_claimer.stop().await;
    c_claimer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_prunes_the_module_versions_no_run_and_no_node_needs() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let registry = RunRegistry::new(store(&url, &schema, "pruner").await);
    let client = sql_in(&url, &schema).await;
    // Four versions stored two hours ago, and one just now.
    let long_ago = (Utc::now() - chrono::Duration::hours(2))
        .timestamp_nanos_opt()
        .unwrap();
    let now = Utc::now().timestamp_nanos_opt().unwrap();
    for (hash, at) in [
        ("sha256:unneeded", long_ago),
        ("sha256:pinned", long_ago),
        ("sha256:loaded", long_ago),
        ("sha256:finished", long_ago),
        ("sha256:fresh", now),
    ] {
        client
            .execute(
                "INSERT INTO module_versions (hash, module_id, bytes, stored_at) \
                 VALUES ($1, 'hello', '\\x00'::bytea, $2)",
                &[&hash, &at],
            )
            .await
            .unwrap();
    }
    // A queued run pinned to one; a finished run to another; a live node
    // (lease an hour ahead) that loaded a third.
    let mut queued = Run::new("hello", "Hello");
    queued.module_version = Some("sha256:pinned".into());
    registry.add_run(&queued).await.unwrap();
    let mut finished = Run::new("hello", "Hello");
    finished.module_version = Some("sha256:finished".into());
    finished.status = RunStatus::Completed;
    registry.add_run(&finished).await.unwrap();
    client
        .execute(
            "INSERT INTO nodes (node_id, started_at, heartbeat_at, lease_until, versions) \
             VALUES ('elsewhere', now(), now(), now() + interval '1 hour', \
             ARRAY['hello@sha256:loaded'])",
            &[],
        )
        .await
        .unwrap();

    // A cleanup that removes no run still prunes.
    let removed = registry
        .cleanup(&modrun::registry::Cleanup::older_than(Duration::from_secs(
            86_400,
        )))
        .await
        .unwrap();
    assert_eq!(removed, 0);
    let kept: Vec<String> = client
        .query("SELECT hash FROM module_versions ORDER BY hash", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        kept,
        ["sha256:fresh", "sha256:loaded", "sha256:pinned"],
        "a version a finished run used, or none, goes; the others stay"
    );
}
