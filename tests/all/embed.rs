use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modrun::error::LoadError;
use modrun::module::{HostFunctions, HostState};
use modrun::wasmtime::StoreContextMut;
use modrun::{Error, Modrun, RunStatus, StartOptions, TaskLimits};
use serde_json::json;

use crate::support::{built_plugins, plugins_dir, test_host_config, wait_until};

/// The application's `acme:app/kv` over `table`, recording which run asked
/// for which key.
fn key_value(
    table: HashMap<&'static str, &'static str>,
    asked: Arc<Mutex<Vec<(String, String)>>>,
) -> HostFunctions {
    HostFunctions::new().interface("acme:app/kv@0.1.0", move |kv| {
        let (table, asked) = (table.clone(), asked.clone());
        kv.func_wrap(
            "get",
            move |store: StoreContextMut<'_, HostState>, (key,): (String,)| {
                let run_id = store.data().run_id().unwrap_or_default().to_owned();
                asked.lock().unwrap().push((run_id, key.clone()));
                Ok((table.get(key.as_str()).map(|value| (*value).to_owned()),))
            },
        )
    })
}

#[tokio::test]
async fn the_entry_point_runs_a_module_and_its_handle_sees_the_end() {
    let dir = plugins_dir(&["hello", "countdown"]);
    let modrun = Modrun::builder()
        .plugins(dir.path())
        .host_config(test_host_config())
        .max_concurrent(4)
        .build()
        .await
        .unwrap();
    assert_eq!(modrun.loaded().loaded, ["countdown", "hello"]);
    assert!(modrun.loaded().failed.is_empty());

    let run = modrun.run("hello", json!({"name": "Ada"})).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    assert_eq!(run.output, Some(json!({"greeting": "Hello, Ada!"})));

    let countdown = modrun
        .start("countdown", json!({"seconds": 30, "step_ms": 10}))
        .await
        .unwrap();
    assert!(modrun.cancel(&countdown).await.unwrap());
    assert_eq!(countdown.wait().await.unwrap().status, RunStatus::Cancelled);

    let unknown = modrun.start("nope", json!({})).await.unwrap_err();
    assert!(matches!(unknown, Error::UnknownModule(_)), "{unknown}");
    let report = modrun.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(report.cancelled.is_empty());
    assert!(matches!(
        modrun.start("hello", json!({})).await.unwrap_err(),
        Error::ShuttingDown
    ));
}

#[tokio::test]
async fn a_sqlite_store_keeps_runs_and_compiled_modules_beside_its_file() {
    let dir = plugins_dir(&["hello"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let run_id = {
        let modrun = Modrun::builder()
            .plugins(dir.path())
            .sqlite(&db)
            .host_config(test_host_config())
            .build()
            .await
            .unwrap();
        assert_eq!(modrun.host().compile_stats().compiled, 1);
        let run = modrun.run("hello", json!({"name": "Bo"})).await.unwrap();
        assert_eq!(run.status, RunStatus::Completed);
        modrun.shutdown(Duration::from_secs(5)).await.unwrap();
        run.run_id
    };
    // The file is closed once the first is dropped; the second finds the
    // run and the compiled module.
    let modrun = Modrun::builder()
        .plugins(dir.path())
        .sqlite(&db)
        .host_config(test_host_config())
        .build()
        .await
        .unwrap();
    let stats = modrun.host().compile_stats();
    assert_eq!((stats.compiled, stats.cache_hits), (0, 1));
    let kept = modrun.registry().get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(kept.status, RunStatus::Completed);
    assert!(data.path().join("cache").is_dir());
}

#[tokio::test]
async fn more_concurrent_runs_than_the_instance_pool_holds_are_refused() {
    let error = Modrun::builder()
        .host_config(test_host_config())
        .limits(TaskLimits {
            max_concurrent: Some(65),
            max_queued: None,
        })
        .build()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("max_concurrent 65"), "{error}");
}

#[tokio::test]
async fn a_plugin_calls_the_applications_host_function_and_others_need_none() {
    let dir = plugins_dir(&["lookup", "hello"]);
    let asked = Arc::new(Mutex::new(Vec::new()));
    let table = HashMap::from([("ada", "Ada Lovelace"), ("grace", "Grace Hopper")]);
    let modrun = Modrun::builder()
        .plugins(dir.path())
        .host_config(test_host_config())
        .host_functions(key_value(table, asked.clone()))
        .build()
        .await
        .unwrap();
    assert_eq!(modrun.loaded().loaded, ["hello", "lookup"]);

    let handle = modrun
        .start("lookup", json!({"keys": ["ada", "alan"]}))
        .await
        .unwrap();
    let run = handle.wait().await.unwrap();
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    assert_eq!(
        run.output,
        Some(json!({"ada": "Ada Lovelace", "alan": null}))
    );
    assert_eq!(
        *asked.lock().unwrap(),
        [
            (handle.id().to_owned(), "ada".to_owned()),
            (handle.id().to_owned(), "alan".to_owned())
        ]
    );
    let hello = modrun.run("hello", json!({})).await.unwrap();
    assert_eq!(hello.status, RunStatus::Completed);
}

#[tokio::test]
async fn a_plugin_importing_an_interface_the_host_lacks_is_refused_by_name() {
    let dir = plugins_dir(&["lookup", "hello"]);
    let modrun = Modrun::builder()
        .plugins(dir.path())
        .host_config(test_host_config())
        .build()
        .await
        .unwrap();
    assert_eq!(modrun.loaded().loaded, ["hello"]);
    let failure = &modrun.loaded().failed[0];
    assert!(
        failure.error.contains(
            "it imports acme:app/kv@0.1.0, which this host does not provide (the application \
             links no such interface)"
        ),
        "{}",
        failure.error
    );

    match modrun.host().load_module(dir.path(), "lookup").await {
        Err(Error::ModuleLoad {
            cause: LoadError::MissingImport { interface, .. },
            ..
        }) => assert_eq!(interface, "acme:app/kv@0.1.0"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_interface_linked_with_other_types_is_refused_with_the_difference() {
    let dir = plugins_dir(&["lookup"]);
    let mistyped = HostFunctions::new().interface("acme:app/kv@0.1.0", |kv| {
        kv.func_wrap(
            "get",
            |_store: StoreContextMut<'_, HostState>, (key,): (u32,)| Ok((key,)),
        )
    });
    let modrun = Modrun::builder()
        .host_config(test_host_config())
        .host_functions(mistyped)
        .build()
        .await
        .unwrap();
    let error = modrun
        .host()
        .load_module(dir.path(), "lookup")
        .await
        .unwrap_err();
    let Error::ModuleLoad {
        cause: LoadError::MissingImport {
            interface, reason, ..
        },
        ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(interface, "acme:app/kv@0.1.0");
    assert!(reason.contains("get"), "{reason}");
    // The chain of causes goes down to the linker's own words.
    assert!(std::error::Error::source(&error).is_some());
}

#[tokio::test]
async fn host_functions_in_modruns_own_namespaces_or_misnamed_are_refused() {
    for name in [
        "wasi:cli/environment@0.2.0",
        "modrun:plugin/host@0.1.0",
        "orders",
    ] {
        let functions = HostFunctions::new().interface(name, |_| Ok(()));
        let error = Modrun::builder()
            .host_config(test_host_config())
            .host_functions(functions)
            .build()
            .await
            .unwrap_err();
        match &error {
            Error::HostFunctions { interface, .. } => assert_eq!(interface, name),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn load_failures_say_their_cause_in_a_type() {
    let dir = tempfile::tempdir().unwrap();
    let hello = std::fs::read(built_plugins().join("hello.wasm")).unwrap();
    let put = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let host = modrun::ModuleHost::new(test_host_config()).unwrap();
    let cause = |result: modrun::Result<modrun::module::ModuleSummary>| match result {
        Err(Error::ModuleLoad { cause, .. }) => cause,
        other => panic!("{other:?}"),
    };
    let garbage = put("garbage.wasm", b"not wasm");
    assert!(matches!(
        cause(host.load_file(&garbage).await),
        LoadError::NotWasm
    ));
    let core = put("core.wasm", b"\0asm\x01\0\0\0");
    assert!(matches!(
        cause(host.load_file(&core).await),
        LoadError::CoreModule
    ));
    let truncated = put("truncated.wasm", &hello[..hello.len() / 2]);
    assert!(matches!(
        cause(host.load_file(&truncated).await),
        LoadError::Invalid(_)
    ));
    let renamed = put("renamed.wasm", &hello);
    match cause(host.load_file(&renamed).await) {
        LoadError::IdMismatch { described, file } => {
            assert_eq!((described.as_str(), file.as_str()), ("hello", "renamed"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        cause(host.load_file(&dir.path().join("absent.wasm")).await),
        LoadError::Missing
    ));
}

#[tokio::test]
async fn an_async_host_function_may_await_and_a_cancel_stops_the_run_inside_it() {
    let dir = plugins_dir(&["lookup"]);
    let release = Arc::new(tokio::sync::Notify::new());
    let waiting = Arc::new(tokio::sync::Notify::new());
    let (held, entered) = (release.clone(), waiting.clone());
    let functions = HostFunctions::new().interface("acme:app/kv@0.1.0", move |kv| {
        let (held, entered) = (held.clone(), entered.clone());
        kv.func_wrap_async(
            "get",
            move |_store: StoreContextMut<'_, HostState>, (key,): (String,)| {
                let (held, entered) = (held.clone(), entered.clone());
                Box::new(async move {
                    // The application's own I/O: here, a wait only the
                    // test ends (keys named "slow"), else a short sleep.
                    if key == "slow" {
                        entered.notify_one();
                        held.notified().await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Ok((Some(key.to_uppercase()),))
                })
            },
        )
    });
    let modrun = Modrun::builder()
        .plugins(dir.path())
        .host_config(test_host_config())
        .host_functions(functions)
        .build()
        .await
        .unwrap();
    let run = modrun
        .run("lookup", json!({"keys": ["ada", "bo"]}))
        .await
        .unwrap();
    assert_eq!(run.output, Some(json!({"ada": "ADA", "bo": "BO"})));
    let holders = Arc::strong_count(&release);

    let stuck = modrun
        .start("lookup", json!({"keys": ["slow"]}))
        .await
        .unwrap();
    waiting.notified().await;
    assert_eq!(Arc::strong_count(&release), holders + 1);
    assert!(stuck.cancel().await.unwrap());
    assert_eq!(stuck.wait().await.unwrap().status, RunStatus::Cancelled);
    // Nothing is left waiting inside the host function: the run's work,
    // dropped as the cancel stops it, took the host call's future with it.
    wait_until("the host call's future dropped", || {
        Arc::strong_count(&release) == holders
    })
    .await;
    release.notify_waiters();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_not_due_at_shutdown_is_left_queued_and_runs_after_the_restart() {
    let dir = plugins_dir(&["hello"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let open = || {
        Modrun::builder()
            .plugins(dir.path())
            .sqlite(&db)
            .host_config(test_host_config())
            .build()
    };
    let at = chrono::Utc::now() + chrono::TimeDelta::milliseconds(1500);
    let (run_id, not_due) = {
        let modrun = open().await.unwrap();
        let options = StartOptions::new().priority(2).not_before(at);
        let later = modrun
            .start_with("hello", json!({"name": "Later"}), &options)
            .await
            .unwrap();
        let far = modrun
            .start_with(
                "hello",
                json!({"name": "Far"}),
                &StartOptions::new().delay(Duration::from_secs(3600)),
            )
            .await
            .unwrap();
        let report = modrun.shutdown(Duration::from_secs(30)).await.unwrap();
        let mut left = report.left_queued.clone();
        left.sort();
        let mut expected = vec![later.id().to_owned(), far.id().to_owned()];
        expected.sort();
        assert_eq!(left, expected, "{report:?}");
        assert!(report.cancelled.is_empty(), "{report:?}");
        for handle in [&later, &far] {
            let run = modrun
                .registry()
                .get_run(handle.id())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(run.status, RunStatus::Queued);
        }
        (later.into_id(), far.into_id())
    };

    let modrun = open().await.unwrap();
    let run = modrun.registry().get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.priority, 2);
    let ended = modrun.handle(&run_id).wait().await.unwrap();
    assert_eq!(ended.status, RunStatus::Completed, "{ended:?}");
    assert!(ended.started_at.unwrap() >= at, "{ended:?}");
    let far = modrun.registry().get_run(&not_due).await.unwrap().unwrap();
    assert_eq!(far.status, RunStatus::Queued, "not due for an hour");
    assert!(
        modrun.manager().is_task_active(&not_due),
        "resumed, waiting"
    );
    modrun.shutdown(Duration::from_secs(30)).await.unwrap();
}
