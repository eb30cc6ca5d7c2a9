use std::time::{Duration, Instant};

use modrun::{Run, RunRegistry, RunStatus};

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A registry and whatever keeps its storage alive (a temporary directory).
pub struct TestRegistry {
    pub registry: RunRegistry,
    pub _dir: Option<tempfile::TempDir>,
}

pub fn memory_registry() -> TestRegistry {
    TestRegistry {
        registry: RunRegistry::in_memory(),
        _dir: None,
    }
}

pub fn sqlite_registry() -> TestRegistry {
    let dir = tempfile::tempdir().expect("temporary directory");
    let registry = RunRegistry::open_sqlite(dir.path().join("registry.db")).expect("open registry");
    TestRegistry {
        registry,
        _dir: Some(dir),
    }
}

/// The PostgreSQL server the tests use (`DATABASE_URL`); `None`, after
/// saying the test was skipped, when none is set (never in CI).
pub fn database_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            static SWEPT: std::sync::Once = std::sync::Once::new();
            SWEPT.call_once(|| drop_old_test_data(&url));
            Some(url)
        }
        _ => require_or_skip("a PostgreSQL server: set DATABASE_URL=postgres://user@host:port/db"),
    }
}

/// Drops the schemas and databases earlier test runs left on the server
/// (each test makes its own, [`fresh_schema`] or [`fresh_database`], and
/// leaves it for whoever looks into a failure): those made over an hour
/// ago, by the time in their name, so that a run going on beside this one
/// keeps its own. Once per process, on a thread of its own, whatever
/// runtime the caller is on.
fn drop_old_test_data(url: &str) {
    let url = url.to_owned();
    let swept = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let hour_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
            for (list, drop) in [
                (
                    "SELECT nspname FROM pg_namespace WHERE nspname ~ '^test_[0-9a-f]{32}$'",
                    "DROP SCHEMA IF EXISTS {} CASCADE",
                ),
                (
                    "SELECT datname FROM pg_database WHERE datname ~ '^test_[0-9a-f]{32}$'",
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                ),
            ] {
                for row in client.query(list, &[]).await? {
                    let name: String = row.get(0);
                    let made = i64::from_str_radix(&name[5..17], 16).unwrap_or(i64::MAX);
                    if made < hour_ago {
                        client.batch_execute(&drop.replace("{}", &name)).await?;
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    });
    match swept.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("old test schemas and databases were not dropped: {e}"),
        Err(_) => eprintln!("old test schemas and databases were not dropped: the sweep panicked"),
    }
}

/// A schema name no other test uses, so that tests sharing one server
/// never see each other's runs.
pub fn fresh_schema() -> String {
    format!("test_{}", uuid::Uuid::now_v7().simple())
}

/// A registry in a fresh schema of the test server; `None` when there is
/// no server (see [`database_url`]).
pub async fn postgres_registry() -> Option<TestRegistry> {
    let url = database_url()?;
    let options = modrun::registry::PostgresOptions {
        schema: fresh_schema(),
        ..modrun::registry::PostgresOptions::default()
    };
    let store = modrun::registry::PostgresStore::connect(&url, options)
        .await
        .expect("connect to the test PostgreSQL server");
    Some(TestRegistry {
        registry: RunRegistry::new(store),
        _dir: None,
    })
}

/// Polls until the run has `status`, failing the test after [`DEADLINE`].
pub async fn wait_for_status(registry: &RunRegistry, run_id: &str, status: RunStatus) -> Run {
    let start = Instant::now();
    loop {
        let found = registry.get_run(run_id).await.expect("registry read");
        if let Some(run) = &found {
            if run.status == status {
                return found.unwrap();
            }
            assert!(
                !run.status.is_terminal(),
                "run {run_id} ended {} while waiting for {status}: {:?}",
                run.status,
                run.error_message
            );
        }
        if start.elapsed() >= DEADLINE {
            // What the run went through, to tell a slow machine from a
            // run nobody started.
            let history = registry.history(run_id).await.expect("registry read");
            panic!(
                "run {run_id} did not become {status} within {DEADLINE:?}; it is {:?}, node {:?}, \
                 history {history:?}",
                found.as_ref().map(|run| run.status),
                found.as_ref().and_then(|run| run.node.as_deref()),
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls `condition` until it holds, failing the test after [`DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what} did not happen within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The statuses of a run's history, in order.
pub async fn statuses(registry: &RunRegistry, run_id: &str) -> Vec<RunStatus> {
    registry
        .history(run_id)
        .await
        .expect("history")
        .into_iter()
        .map(|change| change.status)
        .collect()
}

/// The plugin components the tests use, built once per test binary from
/// `plugins/` (the bundled ones), `tests/plugins/` (the hostile ones) and
/// `examples/embed/` (the one that imports an application's interface).
pub fn built_plugins() -> &'static std::path::Path {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let scratch = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        let out = scratch.join("plugins");
        for workspace in [
            root.join("plugins"),
            root.join("tests/plugins"),
            root.join("examples/embed"),
        ] {
            modrun::module::build_plugins(&workspace, &scratch.join("plugins-target"), &out)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        out
    })
}

/// A fresh plugins directory holding copies of the named built components.
pub fn plugins_dir(ids: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    for id in ids {
        let file = format!("{id}.wasm");
        std::fs::copy(built_plugins().join(&file), dir.path().join(&file))
            .unwrap_or_else(|e| panic!("copy {file}: {e}"));
    }
    dir
}

/// A host configuration small enough for many hosts to live at once in the
/// test binary.
pub fn test_host_config() -> modrun::HostConfig {
    modrun::HostConfig {
        max_instances: 64,
        ..modrun::HostConfig::default()
    }
}

/// Polls until the run is finished, failing the test after [`DEADLINE`].
pub async fn wait_for_end(registry: &RunRegistry, run_id: &str) -> Run {
    let start = Instant::now();
    loop {
        if let Some(run) = registry.get_run(run_id).await.expect("registry read")
            && run.status.is_terminal()
        {
            return run;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "run {run_id} did not finish within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Says that a test needs `what`, which this machine lacks: under CI
/// (`CI=true`) the test fails, since CI must never pass without running it;
/// elsewhere it is skipped with a message.
pub fn require_or_skip<T>(what: &str) -> Option<T> {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run this test, but it needs {what}"
    );
    eprintln!("skipped: this test needs {what}");
    None
}

/// A fresh, empty database on the test server, for processes that take a
/// URL (`modrun serve --db`); `None` when there is no server.
pub async fn fresh_database() -> Option<String> {
    let url = database_url()?;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test PostgreSQL server");
    let driver = tokio::spawn(connection);
    let name = fresh_schema();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    drop(client);
    let _ = driver.await;
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url.as_str(), String::new()),
    };
    let (server, _) = base.rsplit_once('/').expect("a URL with a database name");
    Some(format!("{server}/{name}{query}"))
}

/// Awaits starts that must all answer the same run id, and returns it.
pub async fn one_run_id(
    starts: impl IntoIterator<
        Item = impl std::future::Future<Output = modrun::Result<modrun::RunHandle>>,
    >,
) -> String {
    let ids: Vec<String> = futures_util::future::join_all(starts)
        .await
        .into_iter()
        .map(|started| started.unwrap().into_id())
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    ids[0].clone()
}
