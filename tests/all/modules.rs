use std::time::{Duration, Instant};

use modrun::module::LoadReport;
use modrun::{
    BackgroundTaskManager, Error, LogSource, ModuleHost, ModuleRunner, RunRegistry, RunStatus,
    StartOptions, TaskLimits,
};
use serde_json::json;

use crate::support::{
    DEADLINE, built_plugins, plugins_dir, statuses, test_host_config, wait_for_end, wait_for_status,
};

/// A runner over a fresh plugins directory holding `ids`, with the
/// manifests given as (id, TOML text).
pub(crate) async fn runner_with(
    ids: &[&str],
    manifests: &[(&str, &str)],
) -> (ModuleRunner, tempfile::TempDir, LoadReport) {
    let dir = plugins_dir(ids);
    for (id, text) in manifests {
        std::fs::write(dir.path().join(format!("{id}.toml")), text).unwrap();
    }
    let host = ModuleHost::new(test_host_config()).unwrap();
    let report = host.load_dir(dir.path()).await.unwrap();
    let manager = BackgroundTaskManager::new(RunRegistry::in_memory());
    (ModuleRunner::new(host, manager), dir, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_runs_to_completion_with_output_progress_and_log() {
    let (runner, _dir, report) = runner_with(&["hello"], &[]).await;
    assert_eq!(report.loaded, ["hello"]);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let module = runner.host().module("hello").unwrap();
    assert_eq!(module.info.name, "Hello");
    assert!(module.content_hash.starts_with("sha256:"));
    assert_eq!(module.info.parameters_schema["type"], "object");

    let run_id = runner
        .start("hello", json!({"name": "Ada", "times": 2}))
        .await
        .unwrap();
    let run = wait_for_end(runner.registry(), &run_id).await;
    assert_eq!(run.status, RunStatus::Completed, "{:?}", run.error_message);
    assert_eq!(
        run.output,
        Some(json!({"greeting": "Hello, Ada! Hello, Ada!"}))
    );
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(run.module_version, Some(module.content_hash));
    assert_eq!(run.parameters["name"], "Ada");
    let progress = run.progress.expect("progress reported");
    assert_eq!(
        (progress.fraction, progress.message.as_str()),
        (1.0, "2 of 2")
    );
    assert_eq!(
        statuses(runner.registry(), &run_id).await,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Completed]
    );
    runner.manager().wait_all().await;
    let run = runner.registry().get_run(&run_id).await.unwrap().unwrap();
    let logged: Vec<_> = run
        .log
        .iter()
        .map(|e| (e.source, e.message.as_str()))
        .collect();
    assert!(
        logged.contains(&(LogSource::Log, "greeting Ada")),
        "{logged:?}"
    );
    assert!(
        logged.contains(&(LogSource::Stdout, "said hello 2 time(s)")),
        "{logged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_start_requests_are_refused_and_record_no_run() {
    let (runner, _dir, _) = runner_with(&["hello"], &[]).await;
    let refused = runner.start("nope", json!({})).await.unwrap_err();
    assert!(
        matches!(refused, Error::UnknownModule(ref id) if id == "nope"),
        "{refused:?}"
    );

    let refused = runner.start("hello", json!({"name": 5})).await.unwrap_err();
    let Error::InvalidParameters { problems, .. } = &refused else {
        panic!("{refused:?}");
    };
    assert!(
        problems.iter().any(|p| p.starts_with("/name:")),
        "{problems:?}"
    );
    assert!(refused.to_string().contains("string"), "{refused}");

    let refused = runner
        .start("hello", json!({"nmae": "typo"}))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("nmae"), "{refused}");
    let refused = runner.start("hello", json!([1, 2])).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("must be a JSON object, not an array"),
        "{refused}"
    );
    for unsafe_id in ["../hello", "Hello", "", "a/b", "hello\0", "%2e%2e"] {
        let refused = runner.start(unsafe_id, json!({})).await.unwrap_err();
        assert!(
            matches!(refused, Error::InvalidModuleId(_)),
            "{unsafe_id:?}: {refused:?}"
        );
    }
    // `{"name":"…"}`: 11 bytes of JSON around the name.
    let at_most = modrun::run::MAX_PARAMETERS_BYTES - 11;
    let refused = runner
        .start("hello", json!({"name": "a".repeat(at_most + 1)}))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, Error::InvalidParameters { .. })
            && refused
                .to_string()
                .contains("parameters: more than 16 MiB of JSON, the most a run takes"),
        "{refused}"
    );
    // At the most a run takes, the size passes, and the schema decides
    // (hello's names are short); its problem quotes the value cut.
    let refused = runner
        .start("hello", json!({"name": "a".repeat(at_most)}))
        .await
        .unwrap_err();
    let Error::InvalidParameters { problems, .. } = &refused else {
        panic!("{refused:?}");
    };
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].starts_with("/name: \"aaa")
            && problems[0].ends_with("aaa\" is longer than 200 characters")
            && problems[0].contains(" [cut] ")
            && problems[0].len() < 1200,
        "{}",
        &problems[0][..problems[0].len().min(2000)]
    );
    assert!(runner.registry().recent_runs(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_modules_fail_clearly_while_others_complete() {
    let (runner, _dir, report) = runner_with(
        &[
            "hello", "spin", "membomb", "recurse", "flood", "trap", "panic",
        ],
        &[
            ("spin", "[limits]\ntimeout_secs = 1\n"),
            ("membomb", "[limits]\nmemory_mib = 16\n"),
        ],
    )
    .await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let mut runs = Vec::new();
    for id in [
        "spin", "membomb", "recurse", "flood", "trap", "panic", "hello",
    ] {
        runs.push((id, runner.start(id, json!({})).await.unwrap()));
    }
    let mut ended = std::collections::HashMap::new();
    for (id, run_id) in &runs {
        ended.insert(*id, wait_for_end(runner.registry(), run_id).await);
    }
    let failed_with = |id: &str, words: &str| {
        let run = &ended[id];
        assert_eq!(
            run.status,
            RunStatus::Failed,
            "{id}: {:?}",
            run.error_message
        );
        let message = run.error_message.as_deref().unwrap_or_default();
        assert!(message.contains(words), "{id}: {message}");
        run.exit_code.unwrap()
    };
    assert_eq!(
        failed_with("spin", "timed out after 1s"),
        modrun::run::EXIT_TIMEOUT
    );
    failed_with("membomb", "exceeded its memory limit of 16 MiB");
    failed_with("recurse", "overflowed its stack");
    failed_with("trap", "wasm `unreachable` instruction executed");
    assert_eq!(
        failed_with("panic", "the module panicked: the plugin gave up on {}"),
        modrun::run::EXIT_PANIC
    );
    assert_eq!(ended["hello"].status, RunStatus::Completed);

    let flood = &ended["flood"];
    assert_eq!(
        flood.status,
        RunStatus::Completed,
        "{:?}",
        flood.error_message
    );
    runner.manager().wait_all().await;
    let flood = runner
        .registry()
        .get_run(&runs[3].1)
        .await
        .unwrap()
        .unwrap();
    let stdout: Vec<&str> = flood
        .log
        .iter()
        .filter(|e| e.source == LogSource::Stdout)
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(stdout.len(), 2, "the kept line, then the truncation marker");
    assert_eq!(stdout[0].len(), 64 * 1024, "stdout kept to its cap");
    assert!(
        stdout[1].ends_with("more bytes dropped after the first 65536]"),
        "{}",
        stdout[1]
    );
    assert!(
        flood
            .log
            .iter()
            .any(|e| e.source == LogSource::Stderr && e.message == "flooded")
    );

    // The host is still healthy.
    let after = runner
        .start("hello", json!({"name": "again"}))
        .await
        .unwrap();
    assert_eq!(
        wait_for_end(runner.registry(), &after).await.status,
        RunStatus::Completed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_countdown_stops_at_once() {
    let (runner, _dir, _) = runner_with(&["countdown"], &[]).await;
    let run_id = runner
        .start("countdown", json!({"seconds": 30, "step_ms": 20}))
        .await
        .unwrap();
    // Wait until it has reported progress: it is really counting.
    let start = Instant::now();
    loop {
        let run = runner.registry().get_run(&run_id).await.unwrap().unwrap();
        if run.progress.is_some() {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "no progress from countdown");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(runner.cancel(&run_id).await.unwrap());
    let run = runner.registry().get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
    // The sleeping guest was dropped: its task ends promptly, not in 30 s.
    tokio::time::timeout(Duration::from_secs(5), runner.manager().wait_all())
        .await
        .expect("the cancelled run stopped");
    assert_eq!(
        statuses(runner.registry(), &run_id).await,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Cancelled]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_tight_loop_stops_within_a_tick() {
    let (runner, _dir, _) = runner_with(&["spin", "hello"], &[]).await;
    let spinning: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(runner.start("spin", json!({})).await.unwrap().into_id());
        }
        ids
    };
    for run_id in &spinning {
        wait_for_status(runner.registry(), run_id, RunStatus::Running).await;
    }
    // Other work still gets through while guests spin on both cores.
    let hello = runner.start("hello", json!({})).await.unwrap();
    assert_eq!(
        wait_for_end(runner.registry(), &hello).await.status,
        RunStatus::Completed
    );
    for run_id in &spinning {
        assert!(runner.cancel(run_id).await.unwrap());
    }
    tokio::time::timeout(Duration::from_secs(5), runner.manager().wait_all())
        .await
        .expect("every spinning guest stopped");
    for run_id in &spinning {
        let run = runner.registry().get_run(run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Cancelled);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_denies_files_and_environment_unless_granted() {
    let (runner, _dir, _) = runner_with(&["sandbox"], &[]).await;
    let run_id = runner.start("sandbox", json!({})).await.unwrap();
    let run = wait_for_end(runner.registry(), &run_id).await;
    assert_eq!(run.status, RunStatus::Completed, "{:?}", run.error_message);
    let report = run.output.unwrap();
    assert!(
        report["passwd"].as_str().unwrap().starts_with("denied"),
        "{report}"
    );
    assert_eq!(report["env"], json!([]));
    assert_eq!(report["home"], json!(null));

    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("input.txt"), "from the host").unwrap();
    // SAFETY: the variable is set once here, before the runs that read it.
    unsafe { std::env::set_var("MODRUN_TEST_GRANTED", "visible") };
    let writable = format!(
        "[grants]\nenv = [\"MODRUN_TEST_GRANTED\"]\n[[grants.dirs]]\nhost = {:?}\nguest = \"/data\"\nwritable = true\n",
        data.path().display().to_string()
    );
    let (runner, _dir, report) = runner_with(&["sandbox"], &[("sandbox", &writable)]).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let run_id = runner.start("sandbox", json!({"dir": true})).await.unwrap();
    let report = wait_for_end(runner.registry(), &run_id)
        .await
        .output
        .unwrap();
    assert_eq!(report["write"], "ok: written by the plugin", "{report}");
    assert_eq!(report["read"], "ok: from the host", "{report}");
    assert_eq!(report["env"], json!(["MODRUN_TEST_GRANTED"]));
    assert!(
        report["passwd"].as_str().unwrap().starts_with("denied"),
        "{report}"
    );
    assert_eq!(
        std::fs::read_to_string(data.path().join("note.txt")).unwrap(),
        "written by the plugin"
    );

    let read_only = writable.replace("writable = true", "writable = false");
    let (runner, _dir, _) = runner_with(&["sandbox"], &[("sandbox", &read_only)]).await;
    let run_id = runner.start("sandbox", json!({"dir": true})).await.unwrap();
    let report = wait_for_end(runner.registry(), &run_id)
        .await
        .output
        .unwrap();
    assert!(
        report["write"].as_str().unwrap().starts_with("denied"),
        "{report}"
    );
    assert_eq!(report["read"], "ok: from the host", "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_plugin_file_is_reported_and_the_good_ones_load() {
    let dir = plugins_dir(&["countdown", "liar", "boaster"]);
    let hello = std::fs::read(built_plugins().join("hello.wasm")).unwrap();
    let put = |name: &str, bytes: &[u8]| std::fs::write(dir.path().join(name), bytes).unwrap();
    put("garbage.wasm", b"\x7fELF this is not wasm at all");
    put("empty.wasm", b"");
    put("truncated.wasm", &hello[..hello.len() / 2]);
    put("core.wasm", b"\0asm\x01\0\0\0");
    put("renamed.wasm", &hello);
    put("Bad Name.wasm", &hello);
    put("huge.wasm", &vec![0u8; 3 << 20]);
    put("hello.wasm", &hello);
    put("hello.toml", b"[limits]\ntimeout_secs = \"soon\"\n");
    put("notes.txt", b"not a plugin, not looked at");

    let host = ModuleHost::new(modrun::HostConfig {
        max_module_bytes: 2 << 20,
        ..test_host_config()
    })
    .unwrap();
    let report = host.load_dir(dir.path()).await.unwrap();
    assert_eq!(report.loaded, ["countdown"]);
    let reasons: std::collections::HashMap<String, String> = report
        .failed
        .iter()
        .map(|f| {
            (
                f.path.file_name().unwrap().to_string_lossy().into_owned(),
                f.error.clone(),
            )
        })
        .collect();
    let expect = |file: &str, words: &str| {
        let reason = reasons
            .get(file)
            .unwrap_or_else(|| panic!("{file} not reported: {reasons:?}"));
        assert!(reason.contains(words), "{file}: {reason}");
    };
    expect("garbage.wasm", "not a WebAssembly file");
    expect("empty.wasm", "not a WebAssembly file");
    expect("truncated.wasm", "not a valid component");
    expect("core.wasm", "core WebAssembly module, not a component");
    expect("renamed.wasm", "describes itself as module \"hello\"");
    expect("Bad Name.wasm", "is not a module id");
    expect("huge.wasm", "over the limit of 2097152 bytes");
    expect("hello.wasm", "manifest");
    expect("liar.wasm", "not a valid JSON Schema");
    expect(
        "boaster.wasm",
        "describe() returned a name of 1048576 bytes; a module's may have at most 200",
    );
    assert_eq!(reasons.len(), 10, "{reasons:?}");
    assert_eq!(host.failures().len(), 10);
    assert_eq!(host.module_ids(), ["countdown"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_waiting_for_their_module_limit_hold_no_global_slot() {
    let dir = plugins_dir(&["countdown", "hello"]);
    std::fs::write(
        dir.path().join("countdown.toml"),
        "[limits]\nmax_concurrent = 4\n",
    )
    .unwrap();
    let host = ModuleHost::new(test_host_config()).unwrap();
    host.load_dir(dir.path()).await.unwrap();
    let limits = TaskLimits {
        max_concurrent: Some(64),
        max_queued: Some(1000),
    };
    let manager = BackgroundTaskManager::with_limits(RunRegistry::in_memory(), limits);
    let runner = ModuleRunner::new(host, manager.clone());
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
    assert_eq!(
        manager.queued_task_count(),
        60,
        "the runs past the module's limit wait, queued"
    );

    // 60 global slots are still free: another module runs at once.
    let hello = runner.start("hello", json!({"name": "Ada"})).await.unwrap();
    let hello = wait_for_end(runner.registry(), &hello).await;
    assert_eq!(
        hello.status,
        RunStatus::Completed,
        "{:?}",
        hello.error_message
    );
    for run_id in &countdowns[4..] {
        let run = runner.registry().get_run(run_id).await.unwrap().unwrap();
        assert_eq!(
            run.status,
            RunStatus::Queued,
            "the module's limit still holds"
        );
    }

    // Freeing the module's places starts the next in line, in the order
    // they were started (however their tasks happened to be scheduled).
    for (freed, next) in countdowns[..4].iter().zip(&countdowns[4..8]) {
        assert!(runner.cancel(freed).await.unwrap());
        wait_for_status(runner.registry(), next, RunStatus::Running).await;
    }
    for run_id in &countdowns[8..] {
        let run = runner.registry().get_run(run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Queued, "{run_id} jumped the line");
    }
    for run_id in &countdowns {
        runner.cancel(run_id).await.unwrap();
    }
    manager.wait_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_limit_on_concurrent_runs_keeps_the_rest_queued() {
    let (runner, _dir, _) = runner_with(
        &["countdown"],
        &[("countdown", "[limits]\nmax_concurrent = 1\n")],
    )
    .await;
    let first = runner
        .start("countdown", json!({"seconds": 30, "step_ms": 10}))
        .await
        .unwrap();
    wait_for_status(runner.registry(), &first, RunStatus::Running).await;
    let second = runner
        .start("countdown", json!({"seconds": 0.01, "step_ms": 10}))
        .await
        .unwrap();
    let waiting = runner.registry().get_run(&second).await.unwrap().unwrap();
    assert_eq!(
        waiting.status,
        RunStatus::Queued,
        "the second run waits its turn"
    );
    assert!(runner.cancel(&first).await.unwrap());
    let second = wait_for_end(runner.registry(), &second).await;
    assert_eq!(
        second.status,
        RunStatus::Completed,
        "{:?}",
        second.error_message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_run_waiting_for_its_module_goes_before_earlier_ones() {
    let (runner, _dir, _) = runner_with(
        &["countdown"],
        &[("countdown", "[limits]\nmax_concurrent = 1\n")],
    )
    .await;
    let long = json!({"seconds": 30, "step_ms": 10});
    let first = runner.start("countdown", long.clone()).await.unwrap();
    wait_for_status(runner.registry(), &first, RunStatus::Running).await;
    let start = |priority: i16| {
        let (runner, long) = (runner.clone(), long.clone());
        let options = StartOptions::new().priority(priority);
        async move {
            runner
                .start_with("countdown", long, &options)
                .await
                .unwrap()
        }
    };
    let early = start(0).await;
    let urgent = start(7).await;
    assert!(runner.cancel(&first).await.unwrap());
    wait_for_status(runner.registry(), &urgent, RunStatus::Running).await;
    let run = runner.registry().get_run(&early).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Queued, "the urgent run went first");
    assert!(runner.cancel(&urgent).await.unwrap());
    wait_for_status(runner.registry(), &early, RunStatus::Running).await;
    assert!(runner.cancel(&early).await.unwrap());
    runner.manager().wait_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_handle_waits_cancels_and_follows_its_own_run() {
    let (runner, _dir, _) = runner_with(&["hello", "countdown"], &[]).await;

    // An end that came before the wait is found at once.
    let hello = runner.start("hello", json!({"name": "Ada"})).await.unwrap();
    wait_for_end(runner.registry(), &hello).await;
    let run = hello.wait().await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.output, Some(json!({"greeting": "Hello, Ada!"})));
    assert_eq!(hello.status().await.unwrap(), RunStatus::Completed);

    // Its own events, in order, ending with its end; none of another run's.
    let counting = runner
        .start("countdown", json!({"seconds": 0.2, "step_ms": 20}))
        .await
        .unwrap();
    let events = counting.events();
    let other = runner.start("hello", json!({"name": "Bo"})).await.unwrap();
    let seen: Vec<modrun::RunEvent> = futures_util::StreamExt::collect(events).await;
    assert!(seen.iter().all(|event| event.run_id() == counting.id()));
    assert!(
        seen.iter()
            .any(|event| matches!(event, modrun::RunEvent::Progress { .. })),
        "{seen:?}"
    );
    assert!(matches!(
        seen.last(),
        Some(modrun::RunEvent::Status { change, .. }) if change.status == RunStatus::Completed
    ));
    assert_eq!(other.wait().await.unwrap().status, RunStatus::Completed);

    // A wait that began first hears the cancel.
    let long = runner
        .start("countdown", json!({"seconds": 600}))
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let long = long.clone();
        async move { long.wait().await }
    });
    wait_for_status(runner.registry(), &long, RunStatus::Running).await;
    assert!(long.cancel().await.unwrap());
    let run = waiting.await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
    assert!(!long.cancel().await.unwrap(), "already ended");
    assert_eq!(format!("{long}"), long.id());
    assert_eq!(serde_json::to_value(&long).unwrap(), json!(long.id()));
}
