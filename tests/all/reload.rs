use std::path::Path;
use std::time::Duration;

use modrun::module::ReloadEvent;
use modrun::{BackgroundTaskManager, Error, ModuleHost, ModuleRunner, RunRegistry, RunStatus};
use serde_json::json;
use tokio::sync::broadcast;

use crate::support::{
    DEADLINE, built_plugins, plugins_dir, test_host_config, wait_for_end, wait_for_status,
};

/// How long the watcher waits for a file to be quiet in these tests.
const DEBOUNCE: Duration = Duration::from_millis(50);

fn component(name: &str) -> Vec<u8> {
    std::fs::read(built_plugins().join(format!("{name}.wasm"))).unwrap()
}

/// Writes `bytes` beside `path` and renames it into place, as editors and
/// build tools do.
fn install(path: &Path, bytes: &[u8]) {
    let partial = path.with_file_name(format!(
        ".{}.partial",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&partial, bytes).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// Waits for the first reload event that `wanted` accepts.
async fn next_event(
    events: &mut broadcast::Receiver<ReloadEvent>,
    wanted: impl Fn(&ReloadEvent) -> bool,
) -> ReloadEvent {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let event = events.recv().await.expect("reload events");
            eprintln!("reload event: {event:?}");
            if wanted(&event) {
                return event;
            }
        }
    })
    .await
    .expect("the reload event came within the deadline")
}

async fn watched(ids: &[&str]) -> (ModuleRunner, tempfile::TempDir, modrun::module::Reloader) {
    let dir = plugins_dir(ids);
    let host = ModuleHost::new(test_host_config()).unwrap();
    host.load_dir(dir.path()).await.unwrap();
    let reloader = host.watch(dir.path(), DEBOUNCE).unwrap();
    let runner = ModuleRunner::new(host, BackgroundTaskManager::new(RunRegistry::in_memory()));
    (runner, dir, reloader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_flight_finishes_on_its_version_and_new_runs_get_the_new_one() {
    let (runner, dir, _reloader) = watched(&["countdown"]).await;
    let v1 = runner.host().module("countdown").unwrap().content_hash;
    let mut events = runner.host().subscribe();
    let before = runner
        .start("countdown", json!({"seconds": 1.5, "step_ms": 50}))
        .await
        .unwrap();
    wait_for_status(runner.registry(), &before, RunStatus::Running).await;

    install(
        &dir.path().join("countdown.wasm"),
        &component("countdown_v2"),
    );
    let ReloadEvent::Loaded {
        content_hash: v2, ..
    } = next_event(&mut events, |e| matches!(e, ReloadEvent::Loaded { .. })).await
    else {
        unreachable!()
    };
    assert_ne!(v1, v2);
    assert_eq!(runner.host().module("countdown").unwrap().content_hash, v2);
    let after = runner
        .start("countdown", json!({"seconds": 0.05, "step_ms": 10}))
        .await
        .unwrap();

    let old = wait_for_end(runner.registry(), &before).await;
    assert_eq!(old.status, RunStatus::Completed, "{:?}", old.error_message);
    assert_eq!(old.module_version.as_deref(), Some(v1.as_str()));
    assert_eq!(
        old.output.as_ref().unwrap().get("edition"),
        None,
        "v1's behaviour"
    );
    let new = wait_for_end(runner.registry(), &after).await;
    assert_eq!(new.status, RunStatus::Completed, "{:?}", new.error_message);
    assert_eq!(new.module_version.as_deref(), Some(v2.as_str()));
    assert_eq!(new.output.unwrap()["edition"], 2, "v2's behaviour");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_good_version_serving_and_shows_the_error() {
    let (runner, dir, _reloader) = watched(&["countdown"]).await;
    let good = runner.host().module("countdown").unwrap().content_hash;
    let mut events = runner.host().subscribe();
    let path = dir.path().join("countdown.wasm");
    install(&path, b"\0asm\x0d\0\x01\0 and then garbage");
    next_event(&mut events, |e| matches!(e, ReloadEvent::Failed { .. })).await;

    let module = runner.host().module("countdown").unwrap();
    assert_eq!(module.content_hash, good, "the good version still serves");
    let failure = module
        .last_error
        .expect("the error is listed with the module");
    assert!(
        failure.error.contains("not a valid component"),
        "{}",
        failure.error
    );
    let run_id = runner
        .start("countdown", json!({"seconds": 0.01, "step_ms": 10}))
        .await
        .unwrap();
    assert_eq!(
        wait_for_end(runner.registry(), &run_id).await.status,
        RunStatus::Completed
    );

    // A fixed file clears the error.
    install(&path, &component("countdown_v2"));
    next_event(&mut events, |e| matches!(e, ReloadEvent::Loaded { .. })).await;
    assert_eq!(runner.host().module("countdown").unwrap().last_error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_module_takes_no_new_runs_but_finishes_the_ones_in_flight() {
    let (runner, dir, _reloader) = watched(&["countdown"]).await;
    let mut events = runner.host().subscribe();
    let in_flight = runner
        .start("countdown", json!({"seconds": 0.6, "step_ms": 50}))
        .await
        .unwrap();
    wait_for_status(runner.registry(), &in_flight, RunStatus::Running).await;
    std::fs::remove_file(dir.path().join("countdown.wasm")).unwrap();
    next_event(&mut events, |e| matches!(e, ReloadEvent::Retired { .. })).await;

    let refused = runner
        .start("countdown", json!({"seconds": 1}))
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::UnknownModule(_)), "{refused:?}");
    let run = wait_for_end(runner.registry(), &in_flight).await;
    assert_eq!(run.status, RunStatus::Completed, "{:?}", run.error_message);

    // A new file adds the module back.
    install(&dir.path().join("countdown.wasm"), &component("countdown"));
    next_event(&mut events, |e| matches!(e, ReloadEvent::Loaded { .. })).await;
    assert!(runner.host().module("countdown").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_writes_settle_on_the_last_content() {
    let (runner, dir, _reloader) = watched(&["countdown"]).await;
    let path = dir.path().join("countdown.wasm");
    let (v1, v2) = (component("countdown"), component("countdown_v2"));
    for bytes in [&v2, &v1, &v2, &v1, &v2] {
        std::fs::write(&path, bytes).unwrap();
    }
    let v2_hash = {
        use sha2::Digest;
        format!("sha256:{:x}", sha2::Sha256::digest(&v2))
    };
    let start = std::time::Instant::now();
    loop {
        let current = runner.host().module("countdown").unwrap().content_hash;
        if current == v2_hash {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "never settled on the last write"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Nothing is left half-loaded or failed.
    assert!(
        runner.host().failures().is_empty(),
        "{:?}",
        runner.host().failures()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_change_applies_to_new_runs() {
    let (runner, dir, _reloader) = watched(&["countdown"]).await;
    let mut events = runner.host().subscribe();
    std::fs::write(
        dir.path().join("countdown.toml"),
        "[limits]\ntimeout_secs = 0.2\n",
    )
    .unwrap();
    next_event(&mut events, |e| matches!(e, ReloadEvent::Loaded { .. })).await;
    let module = runner.host().module("countdown").unwrap();
    assert_eq!(module.manifest.limits.timeout, Duration::from_millis(200));
    let run_id = runner
        .start("countdown", json!({"seconds": 5, "step_ms": 50}))
        .await
        .unwrap();
    let run = wait_for_end(runner.registry(), &run_id).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run.error_message.unwrap().contains("timed out after 0.2s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_and_hidden_files_are_ignored() {
    let (runner, dir, _reloader) = watched(&["countdown"]).await;
    let mut events = runner.host().subscribe();
    for name in [
        ".countdown.wasm.swp",
        "countdown.wasm~",
        ".hello.wasm.partial",
        "4913",
    ] {
        std::fs::write(dir.path().join(name), b"editor noise").unwrap();
    }
    // A real change afterwards is the first event seen: the noise made none.
    install(
        &dir.path().join("countdown.wasm"),
        &component("countdown_v2"),
    );
    let first = next_event(&mut events, |_| true).await;
    assert!(
        matches!(first, ReloadEvent::Loaded { ref module_id, .. } if module_id == "countdown"),
        "{first:?}"
    );
    assert!(
        runner.host().failures().is_empty(),
        "{:?}",
        runner.host().failures()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_compiled_modules_from_the_cache() {
    let plugins = plugins_dir(&["hello", "countdown"]);
    let cache = tempfile::tempdir().unwrap();
    let config = || modrun::HostConfig {
        cache_dir: Some(cache.path().join("compiled")),
        ..test_host_config()
    };
    let first = ModuleHost::new(config()).unwrap();
    first.load_dir(plugins.path()).await.unwrap();
    assert_eq!(first.compile_stats().compiled, 2);
    assert_eq!(first.compile_stats().cache_hits, 0);
    drop(first);

    let second = ModuleHost::new(config()).unwrap();
    let report = second.load_dir(plugins.path()).await.unwrap();
    assert_eq!(report.loaded, ["countdown", "hello"]);
    assert_eq!(second.compile_stats().compiled, 0, "nothing compiled again");
    assert_eq!(second.compile_stats().cache_hits, 2);
    let runner = ModuleRunner::new(second, BackgroundTaskManager::new(RunRegistry::in_memory()));
    let run_id = runner
        .start("hello", json!({"name": "cache"}))
        .await
        .unwrap();
    assert_eq!(
        wait_for_end(runner.registry(), &run_id).await.status,
        RunStatus::Completed
    );

    // A damaged cache entry is dropped and compiled again, not trusted.
    for entry in std::fs::read_dir(cache.path().join("compiled")).unwrap() {
        std::fs::write(entry.unwrap().path(), b"not machine code").unwrap();
    }
    let third = ModuleHost::new(config()).unwrap();
    assert_eq!(
        third.load_dir(plugins.path()).await.unwrap().loaded.len(),
        2
    );
    assert_eq!(third.compile_stats().compiled, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_inside_the_plugins_directory_is_refused() {
    let plugins = plugins_dir(&["hello"]);
    let host = ModuleHost::new(modrun::HostConfig {
        cache_dir: Some(plugins.path().join("cache")),
        ..test_host_config()
    })
    .unwrap();
    let refused = host.load_dir(plugins.path()).await.unwrap_err();
    assert!(
        refused.to_string().contains("compiled-module cache"),
        "{refused}"
    );
}

/// Waits until a path ending with `name` is heard, and answers everything
/// heard until then.
async fn heard_until(
    heard: &mut tokio::sync::mpsc::UnboundedReceiver<std::path::PathBuf>,
    name: &str,
) -> Vec<std::path::PathBuf> {
    tokio::time::timeout(DEADLINE, async {
        let mut paths = Vec::new();
        loop {
            let path = heard.recv().await.expect("the watch goes on");
            let last = path.ends_with(name);
            paths.push(path);
            if last {
                return paths;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name} was not heard within {DEADLINE:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_watch_leaves_out_build_output_and_packages_and_follows_new_and_linked_folders() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().canonicalize().unwrap();
    for folder in [
        "tool/src",
        "tool/node_modules/pkg/lib",
        "tool/.venv/lib",
        "target/debug",
    ] {
        std::fs::create_dir_all(plugins.join(folder)).unwrap();
    }
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(elsewhere.path().join("src")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), plugins.join("linked")).unwrap();
    let host = ModuleHost::new(test_host_config()).unwrap();
    let (heard_path, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let _watch = host
        .watch_tree(&plugins, DEBOUNCE, move |paths| {
            for path in paths {
                let _ = heard_path.send(path);
            }
        })
        .unwrap();

    // Written together: what a watch of the whole tree hears in one batch.
    for left_out in [
        "tool/node_modules/pkg/lib/index.js",
        "tool/.venv/lib/site.py",
        "target/debug/out.o",
    ] {
        std::fs::write(plugins.join(left_out), "x").unwrap();
    }
    std::fs::write(plugins.join("tool/src/main.js"), "x").unwrap();
    let paths = heard_until(&mut heard, "main.js").await;
    for path in &paths {
        let relative = path.strip_prefix(&plugins).unwrap();
        assert!(
            relative.starts_with("tool/src"),
            "heard a change in a folder left out: {}",
            relative.display()
        );
    }

    // A folder made after the watch began: the files already in it are
    // heard, and so are the ones written later.
    std::fs::create_dir_all(plugins.join("tool/src/deep/er")).unwrap();
    std::fs::write(plugins.join("tool/src/deep/er/early.js"), "x").unwrap();
    heard_until(&mut heard, "early.js").await;
    std::fs::write(plugins.join("tool/src/deep/er/later.js"), "x").unwrap();
    heard_until(&mut heard, "later.js").await;

    // A plugin folder that is a link to one elsewhere is watched through
    // the link, as a watch of the whole tree followed links.
    std::fs::write(elsewhere.path().join("src/lib.js"), "x").unwrap();
    heard_until(&mut heard, "lib.js").await;
}
