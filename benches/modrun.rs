//! modrun's benchmarks: one row per figure, each beside a baseline measured
//! in the same run, their ratio, and the goal.
//!
//! `cargo bench --bench modrun` for the full run, `cargo bench --bench modrun -- --quick`
//! for one under a minute (smaller counts; the same rows). Naming groups
//! (`throughput`, `status-change`, `memory`, `commit`, `wasm`, `reload`, `http`, `dev`,
//! `handle`, `polyglot`, `dashboard`, `retention`, `postgres`) runs only those. The `polyglot` rows build the
//! Python and JavaScript examples; a quick run skips them until those were built once. The `postgres` rows need a server: set
//! `DATABASE_URL=postgres://user@host:port/db` (each run uses a fresh schema).

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use modrun::{BackgroundTaskManager, Run, RunFilter, RunRegistry, Transition};

#[path = "modrun/dashboard.rs"]
mod dashboard;
#[path = "modrun/handle.rs"]
mod handle;
#[path = "modrun/polyglot.rs"]
mod polyglot;

/// Counts live heap bytes, so memory per task is measured, not estimated.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// How many concurrent callers start tasks (a server's concurrent requests).
const PRODUCERS: usize = 64;

/// Concurrent callers of the PostgreSQL burst row.
const BURST_PRODUCERS: usize = 512;

struct Sizes {
    wasm_calls: usize,
    sleeping_runs: usize,
    tasks: usize,
    history: usize,
    changes: usize,
    in_flight: usize,
    /// Finished runs in the registry of the retention rows, and how many
    /// of them (the oldest) their cleanup removes.
    retained: usize,
    cleaned: usize,
    /// Runs a PostgreSQL node ended before the stored-runs row measures it.
    ended_on_node: usize,
    /// Distinct modules of the cold-start row.
    cold_modules: usize,
    /// The node lease of the lost-node row (the default in a full run).
    lease: Duration,
}

struct Row {
    name: String,
    value: String,
    baseline: String,
    ratio: f64,
    goal: &'static str,
}

impl Row {
    /// A row of the p99 of `values` against that of `baseline`, in ms.
    fn p99_ms(
        name: &str,
        values: &mut [Duration],
        baseline: &mut [Duration],
        decimals: usize,
        goal: &'static str,
    ) -> Row {
        values.sort();
        baseline.sort();
        let p99 = |sorted: &[Duration]| percentile(sorted, 0.99).as_secs_f64() * 1e3;
        Row::measured(name, p99(values), p99(baseline), decimals, goal)
    }

    /// A row of a figure and its baseline, both measured in this run, shown
    /// with `decimals` digits.
    fn measured(name: &str, value: f64, baseline: f64, decimals: usize, goal: &'static str) -> Row {
        Row {
            name: name.to_owned(),
            value: format!("{value:.decimals$}"),
            baseline: format!("{baseline:.decimals$}"),
            ratio: value / baseline,
            goal,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let sizes = if quick {
        Sizes {
            wasm_calls: 2_000,
            sleeping_runs: 2_500,
            tasks: 50_000,
            history: 20_000,
            changes: 10_000,
            in_flight: 50_000,
            // 0.1% of them failed: the failed-runs row lists 100.
            retained: 100_000,
            cleaned: 30_000,
            ended_on_node: 50_000,
            cold_modules: 20,
            lease: Duration::from_secs(2),
        }
    } else {
        Sizes {
            wasm_calls: 20_000,
            sleeping_runs: 10_000,
            tasks: 300_000,
            history: 100_000,
            changes: 100_000,
            in_flight: 100_000,
            retained: 1_000_000,
            cleaned: 1_000_000,
            ended_on_node: 200_000,
            cold_modules: 50,
            lease: modrun::registry::DEFAULT_LEASE,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    let started = Instant::now();
    // Any other argument picks the groups whose name contains it.
    let picks: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let wanted = |group: &str| picks.is_empty() || picks.iter().any(|p| group.contains(p.as_str()));
    // Runs a group when it is wanted, and says how long it took.
    macro_rules! group {
        ($name:literal, $figures:expr) => {
            if wanted($name) {
                let began = Instant::now();
                $figures;
                eprintln!("{}: {:.1} s", $name, began.elapsed().as_secs_f64());
            }
        };
    }
    runtime.block_on(async {
        group!(
            "throughput",
            task_throughput(&sizes, dir.path(), &mut rows).await?
        );
        group!(
            "status-change",
            status_change_cost(&sizes, dir.path(), &mut rows).await?
        );
        group!("memory", memory_per_task(&sizes, &mut rows).await?);
        group!("commit", commit_latency(dir.path(), &mut rows).await?);
        group!("reload", reload_figures(&sizes, &mut rows).await?);
        group!("http", http_figures(&sizes, dir.path(), &mut rows).await?);
        group!("wasm", wasm_figures(&sizes, dir.path(), &mut rows).await?);
        group!("dev", dev_figures(quick, &mut rows)?);
        group!("handle", handle::handle_figures(quick, &mut rows).await?);
        group!(
            "dashboard",
            dashboard::dashboard_figures(quick, dir.path(), &mut rows).await?
        );
        group!(
            "polyglot",
            polyglot::polyglot_figures(quick, &mut rows).await?
        );
        group!(
            "retention",
            retention_figures(&sizes, dir.path(), &mut rows).await?
        );
        group!("postgres", postgres_figures(&sizes, &mut rows).await?);
        anyhow::Ok(())
    })?;
    print_table(&rows);
    println!(
        "\n{} mode, {:.1} s; {} worker threads",
        if quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<52} {:>16} {:>16} {:>8}  goal",
        "figure", "value", "baseline", "ratio"
    );
    for row in rows {
        println!(
            "{:<52} {:>16} {:>16} {:>8.3}  {}",
            row.name, row.value, row.baseline, row.ratio, row.goal
        );
    }
}

/// Starts `count` trivial tasks from [`PRODUCERS`] concurrent callers and
/// waits until every one is recorded `Completed`; returns tasks per second.
async fn tasks_per_second(manager: &BackgroundTaskManager, count: usize) -> f64 {
    let begin = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let manager = manager.clone();
            tokio::spawn(async move {
                for _ in 0..count / PRODUCERS {
                    manager
                        .start_task(Run::new("bench", "Bench"), async {})
                        .await
                        .expect("start");
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.expect("producer");
    }
    manager.wait_all().await;
    (count / PRODUCERS * PRODUCERS) as f64 / begin.elapsed().as_secs_f64()
}

/// The same shape with bare tokio: spawn a trivial task and await its handle.
async fn bare_tokio_per_second(count: usize) -> f64 {
    let begin = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..count / PRODUCERS {
                    tokio::spawn(async {}).await.expect("task");
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.expect("producer");
    }
    (count / PRODUCERS * PRODUCERS) as f64 / begin.elapsed().as_secs_f64()
}

async fn task_throughput(
    sizes: &Sizes,
    dir: &std::path::Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    // Warm up the runtime's threads and allocator once.
    bare_tokio_per_second(10_000).await;
    let baseline = bare_tokio_per_second(sizes.tasks).await;

    let memory = BackgroundTaskManager::new(RunRegistry::in_memory());
    let in_memory = tasks_per_second(&memory, sizes.tasks).await;
    rows.push(Row::measured(
        "tasks started->completed /s, in-memory registry",
        in_memory,
        baseline,
        0,
        ">= 200000/s (baseline: bare tokio spawn+join)",
    ));

    let sqlite = BackgroundTaskManager::new(RunRegistry::open_sqlite(dir.join("throughput.db"))?);
    let on_disk = tasks_per_second(&sqlite, sizes.tasks).await;
    rows.push(Row::measured(
        "tasks started->completed /s, SQLite registry",
        on_disk,
        baseline,
        0,
        ">= 50000/s (baseline: bare tokio spawn+join)",
    ));
    Ok(())
}

/// Microseconds per status change, amortized over `changes` concurrent ones,
/// in a registry that already holds `prefill` runs.
async fn change_cost_us(
    registry: &RunRegistry,
    prefill: usize,
    changes: usize,
) -> anyhow::Result<f64> {
    let add = |count: usize| {
        let registry = registry.clone();
        run_concurrently(count, move |_| {
            let registry = registry.clone();
            async move {
                let run = Run::new("history", "History");
                registry.add_run(&run).await.expect("add");
                run.run_id
            }
        })
    };
    add(prefill).await;
    let fresh = std::sync::Arc::new(add(changes).await);
    // Let the registry settle: measure status changes, not the background
    // copy of the prefill's log into the database file.
    registry.flush().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let begin = Instant::now();
    let registry = registry.clone();
    run_concurrently(changes, move |index| {
        let registry = registry.clone();
        let run_id = fresh[index].clone();
        async move {
            assert!(
                registry
                    .transition(&Transition::running(&run_id))
                    .await
                    .expect("change")
            );
        }
    })
    .await;
    Ok(begin.elapsed().as_secs_f64() * 1e6 / changes as f64)
}

/// Calls `make(i)` for every `i` below `count` from [`PRODUCERS`] concurrent
/// tasks and returns the outputs in index order.
async fn run_concurrently<T, F, Fut>(count: usize, make: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = T> + Send,
{
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|producer| {
            let make = make.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for index in (producer..count).step_by(PRODUCERS) {
                    out.push((index, make(index).await));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::with_capacity(count);
    for producer in producers {
        all.extend(producer.await.expect("producer"));
    }
    all.sort_unstable_by_key(|(index, _)| *index);
    all.into_iter().map(|(_, value)| value).collect()
}

async fn status_change_cost(
    sizes: &Sizes,
    dir: &std::path::Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let empty = RunRegistry::open_sqlite(dir.join("empty.db"))?;
    let baseline = change_cost_us(&empty, 0, sizes.changes).await?;
    let full = RunRegistry::open_sqlite(dir.join("history.db"))?;
    let with_history = change_cost_us(&full, sizes.history, sizes.changes).await?;
    let stored = sizes.history / 1000;
    rows.push(Row::measured(
        &format!("SQLite status change, us, {stored}k runs already stored"),
        with_history,
        baseline,
        2,
        "<= 10 us, ratio ~1 (baseline: empty registry)",
    ));

    let empty = RunRegistry::in_memory();
    let baseline = change_cost_us(&empty, 0, sizes.changes).await?;
    let full = RunRegistry::in_memory();
    let with_history = change_cost_us(&full, sizes.history, sizes.changes).await?;
    rows.push(Row::measured(
        &format!("in-memory status change, us, {stored}k runs stored"),
        with_history,
        baseline,
        2,
        "ratio ~1 (baseline: empty registry)",
    ));
    Ok(())
}

async fn memory_per_task(sizes: &Sizes, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let count = sizes.in_flight;
    let parameters = serde_json::json!({"name": "Ada", "count": 3});

    // Baseline: bare tokio tasks parked on a pending future.
    let before = live_bytes();
    let parked: Vec<_> = (0..count)
        .map(|_| tokio::spawn(std::future::pending::<()>()))
        .collect();
    tokio::task::yield_now().await;
    let bare = (live_bytes() - before) as f64 / count as f64;
    parked.iter().for_each(tokio::task::JoinHandle::abort);
    drop(parked);

    // The registry's share: the run record and its one-entry history.
    let registry = RunRegistry::in_memory();
    let before = live_bytes();
    for _ in 0..count {
        let run = Run::new("sleeper", "Sleeper").with_parameters(parameters.clone());
        registry.add_run(&run).await?;
    }
    let record = (live_bytes() - before) as f64 / count as f64;
    drop(registry);

    // The whole thing: a manager with `count` tasks in flight, each running
    // (two history entries) and waiting.
    let registry = RunRegistry::in_memory();
    let manager = BackgroundTaskManager::new(registry.clone());
    let before = live_bytes();
    for _ in 0..count {
        let run = Run::new("sleeper", "Sleeper").with_parameters(parameters.clone());
        manager
            .start_task(run, std::future::pending::<()>())
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while registry
        .runs_by_status(modrun::RunStatus::Running)
        .await?
        .len()
        < count
    {
        anyhow::ensure!(Instant::now() < deadline, "tasks did not all start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = (live_bytes() - before) as f64 / count as f64;
    manager.shutdown(Duration::ZERO).await?;

    rows.push(Row::measured(
        &format!("host memory per in-flight task, bytes ({}k)", count / 1000),
        total,
        bare,
        0,
        "<= 2048 B (baseline: bare parked tokio task)",
    ));
    rows.push(Row::measured(
        "  of which run record + history in registry, bytes",
        record,
        total,
        0,
        "(split of the row above)",
    ));
    Ok(())
}

/// The target directory, where the benchmarks keep what they build.
fn target_dir() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), std::path::PathBuf::from)
}

/// Builds the bundled and the test plugins for the WebAssembly rows, once
/// per benchmark run (each build asks cargo, which takes a while even
/// when nothing changed).
fn bench_plugins() -> anyhow::Result<std::path::PathBuf> {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    if let Some(out) = BUILT.get() {
        return Ok(out.clone());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = target_dir();
    let out = target.join("bench-plugins");
    for workspace in ["plugins", "tests/plugins"] {
        modrun::module::build_plugins(&root.join(workspace), &target.join("plugins"), &out)?;
    }
    Ok(BUILT.get_or_init(|| out).clone())
}

/// The inner loop of plugin development: a one-line edit of `hello` saved,
/// until `modrun dev --run hello` prints the new output; against `cargo
/// build` of the plugin alone after the same kind of edit. Both build in the
/// same, warm target directory, so both are incremental builds.
fn dev_figures(quick: bool, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use std::io::BufRead;
    bench_plugins()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), std::path::PathBuf::from)
        .join("plugins");
    let copy = tempfile::tempdir()?;
    for dir in ["plugins", "wit"] {
        copy_sources(&root.join(dir), &copy.path().join(dir))?;
    }
    let plugins = copy.path().join("plugins");
    let source = plugins.join("hello/src/lib.rs");
    let original = std::fs::read_to_string(&source)?;
    let edit =
        |n: usize| original.replace("\"Hello, {name}!\"", &format!("\"Hello{n}, {{name}}!\""));
    let edits = if quick { 2 } else { 7 };

    let data = tempfile::tempdir()?;
    let mut dev = std::process::Command::new(env!("CARGO_BIN_EXE_modrun"))
        .args(["dev", "--bind", "127.0.0.1:0", "--in-memory", "--plugins"])
        .arg(&plugins)
        .arg("--db")
        .arg(data.path().join("registry.db"))
        .arg("--target-dir")
        .arg(&target)
        .args(["--run", "hello", "name=Ada"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let (sender, lines) = std::sync::mpsc::channel::<String>();
    let stdout = dev.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |text: &str| -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return Ok(()),
                Ok(_) => {}
                Err(_) => anyhow::bail!("modrun dev did not print {text:?} in time"),
            }
        }
    };
    wait_for("watching")?;
    wait_for("Hello, Ada!")?;
    let mut loop_times = Vec::new();
    for n in 1..=edits {
        let started = Instant::now();
        std::fs::write(&source, edit(n))?;
        wait_for(&format!("Hello{n}, Ada!"))?;
        loop_times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let _ = dev.kill();
    let _ = dev.wait();

    let mut build_times = Vec::new();
    for n in 1..=edits {
        std::fs::write(&source, edit(edits + n))?;
        let started = Instant::now();
        let built = std::process::Command::new("cargo")
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "-p",
                "hello",
                "--manifest-path",
            ])
            .arg(plugins.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .stderr(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(built.success(), "cargo build of hello failed");
        build_times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    rows.push(Row::measured(
        "dev: save -> new output printed, p50 ms",
        median(&mut loop_times),
        median(&mut build_times),
        0,
        "<= 1.5 x (baseline: cargo build of the plugin alone)",
    ));
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Copies plugin sources (not build output or components) from `from` to `to`.
fn copy_sources(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_name() == "target" || path.extension().is_some_and(|ext| ext == "wasm") {
            continue;
        }
        if entry.file_type()?.is_dir() {
            copy_sources(&path, &to.join(entry.file_name()))?;
        } else {
            std::fs::copy(&path, to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// The store data of the bare-wasmtime baseline: WASI and nothing else.
struct Bare {
    wasi: wasmtime_wasi::WasiCtx,
    table: wasmtime::component::ResourceTable,
}

impl wasmtime_wasi::WasiView for Bare {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// `component` ready to instantiate with bare wasmtime: WASI, and host
/// functions that do nothing.
fn bare_pre(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
) -> anyhow::Result<wasmtime::component::InstancePre<Bare>> {
    let mut linker: wasmtime::component::Linker<Bare> = wasmtime::component::Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut host = linker
        .instance("modrun:plugin/host@0.1.0")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for name in ["log", "progress"] {
        host.func_new_async(name, |_, _, _, _| Box::new(async { Ok(()) }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    linker
        .instantiate_pre(component)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Bare wasmtime on modrun's engine configuration: instantiate `hello` from
/// an `InstancePre` and call `run`, `count` times from [`PRODUCERS`] tasks
/// (or one task when `sequential`); returns calls per second.
async fn bare_wasmtime_per_second(
    component: &std::path::Path,
    config: wasmtime::Config,
    count: usize,
    sequential: bool,
) -> anyhow::Result<f64> {
    use wasmtime::component::Component;
    let engine = wasmtime::Engine::new(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let component = Component::from_file(&engine, component).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pre = bare_pre(&engine, &component)?;
    let plugin = component
        .get_export_index(None, "modrun:plugin/plugin@0.1.0")
        .ok_or_else(|| anyhow::anyhow!("no plugin export"))?;
    let run = component
        .get_export_index(Some(&plugin), "run")
        .ok_or_else(|| anyhow::anyhow!("no run export"))?;
    let call = move || {
        let (pre, run, engine) = (pre.clone(), run, engine.clone());
        async move {
            let wasi = wasmtime_wasi::WasiCtx::builder().build();
            let table = wasmtime::component::ResourceTable::new();
            let mut store = wasmtime::Store::new(&engine, Bare { wasi, table });
            store.set_epoch_deadline(u64::MAX / 2);
            let instance = pre
                .instantiate_async(&mut store)
                .await
                .expect("instantiate");
            let func = instance
                .get_typed_func::<(&str,), (Result<String, String>,)>(&mut store, &run)
                .expect("run's type");
            let (output,) = func
                .call_async(&mut store, (r#"{"name":"Ada"}"#,))
                .await
                .expect("call");
            output.expect("hello succeeds");
        }
    };
    let producers = if sequential { 1 } else { PRODUCERS };
    let begin = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                for _ in 0..count / producers {
                    call().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    Ok((count / producers * producers) as f64 / begin.elapsed().as_secs_f64())
}

/// modrun end to end: `start("hello")` until `Completed` is recorded, on
/// one node per registry (several nodes of one database share the
/// producers evenly), from `producers` concurrent callers. One producer
/// awaits each run before it starts the next (sequential).
async fn modrun_runs_per_second(
    plugins: &std::path::Path,
    registries: Vec<RunRegistry>,
    count: usize,
    producers: usize,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(plugins.join("hello.wasm"), dir.path().join("hello.wasm"))?;
    let mut runners = Vec::new();
    let mut claimers = Vec::new();
    for registry in registries {
        let host = modrun::ModuleHost::new(modrun::HostConfig::default())?;
        host.load_dir(dir.path()).await?;
        let runner = modrun::ModuleRunner::new(host, BackgroundTaskManager::new(registry));
        // On a database nodes share, the store is the queue, as `serve` has it.
        if runner.registry().is_shared_queue() {
            claimers.push(runner.claim_from_queue()?);
        }
        runners.push(runner);
    }
    let sequential = producers == 1;
    let begin = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|index| {
            let runner = runners[index % runners.len()].clone();
            tokio::spawn(async move {
                let queue = runner.registry().is_shared_queue();
                for _ in 0..count / producers {
                    // Through a shared queue the run is not this manager's
                    // until claimed: its end is heard, not waited for.
                    let mut events = (sequential && queue).then(|| runner.registry().subscribe());
                    let run_id = runner
                        .start("hello", serde_json::json!({"name": "Ada"}))
                        .await
                        .expect("start");
                    match &mut events {
                        Some(events) => wait_for_end(events, &run_id).await,
                        None if sequential => runner.manager().wait_all().await,
                        None => {}
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    // Every run has ended once none is queued or running anywhere.
    let active = RunFilter {
        statuses: vec![modrun::RunStatus::Queued, modrun::RunStatus::Running],
        limit: Some(1),
        ..RunFilter::default()
    };
    for runner in &runners {
        while !runner.registry().list_summaries(&active).await?.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        runner.manager().wait_all().await;
    }
    let rate = (count / producers * producers) as f64 / begin.elapsed().as_secs_f64();
    for claimer in claimers {
        claimer.stop().await;
    }
    for runner in &runners {
        ensure_none_failed(runner.registry(), "hello").await?;
    }
    Ok(rate)
}

/// Fails the benchmark if any run of `registry` failed, saying why the
/// first did: a figure of failed runs measures nothing.
async fn ensure_none_failed(registry: &RunRegistry, what: &str) -> anyhow::Result<()> {
    let failed = registry.runs_by_status(modrun::RunStatus::Failed).await?;
    anyhow::ensure!(
        failed.is_empty(),
        "runs of {what} failed: {:?}",
        failed[0].error_message
    );
    Ok(())
}

/// Waits for the event that ends `run_id` (the run executes on the node
/// whose events these are).
async fn wait_for_end(
    events: &mut tokio::sync::broadcast::Receiver<modrun::RunEvent>,
    run_id: &str,
) {
    loop {
        match events.recv().await {
            Ok(modrun::RunEvent::Status {
                run_id: id, change, ..
            }) if id == run_id && change.status.is_terminal() => {
                return;
            }
            Ok(_) => {}
            Err(e) => panic!("the run's events were lost: {e}"),
        }
    }
}

fn resident_bytes() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    Ok(kib * 1024.0)
}

/// A SQLite registry holding `count` runs that ended 40 days ago (one in
/// a thousand failed, the rest completed), written straight into its
/// tables in one transaction: what a server that ran for months holds.
/// Fills the registry at `path` with `count` finished runs, one a
/// millisecond from 40 days ago on; returns when the first ended.
/// A SQLite registry at `path` holding `count` runs that ended 40 days
/// ago, as [`fill_old_runs`] makes it: filled once per count and run of
/// the benchmarks, then copied.
fn old_runs_copy(path: &std::path::Path, count: usize) -> anyhow::Result<DateTime<Utc>> {
    static FILLED: std::sync::Mutex<Vec<(usize, tempfile::TempDir, DateTime<Utc>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut filled = FILLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !filled.iter().any(|(n, _, _)| *n == count) {
        let dir = tempfile::tempdir()?;
        let first = fill_old_runs(&dir.path().join("registry.db"), count)?;
        filled.push((count, dir, first));
    }
    let (_, dir, first) = filled.iter().find(|(n, _, _)| *n == count).expect("filled");
    std::fs::copy(dir.path().join("registry.db"), path)?;
    Ok(*first)
}

fn fill_old_runs(path: &std::path::Path, count: usize) -> anyhow::Result<DateTime<Utc>> {
    drop(RunRegistry::open_sqlite(path)?);
    let mut conn = rusqlite::Connection::open(path)?;
    let tx = conn.transaction()?;
    let first = (Utc::now() - chrono::Duration::days(40))
        .timestamp_nanos_opt()
        .unwrap_or_default();
    {
        let mut runs = tx.prepare(
            "INSERT INTO runs (run_id, module_id, module_name, status, created_at, started_at, \
             completed_at, parameters, exit_code, error_message, output, module_version, \
             history_len) VALUES (?1, 'hello', 'Hello', ?2, ?3, ?3 + 1000, ?3 + 2000, \
             '{\"name\":\"Ada\"}', ?4, ?5, '{\"greeting\":\"Hello, Ada!\"}', 'sha256:x', 3)",
        )?;
        let mut history = tx.prepare(
            "INSERT INTO run_history (run, seq, status, at) VALUES (?1, 0, 'queued', ?2), \
             (?1, 1, 'running', ?2 + 1000), (?1, 2, ?3, ?2 + 2000)",
        )?;
        for index in 0..count {
            let failed = index % 1000 == 999;
            let status = if failed { "failed" } else { "completed" };
            let at = first + index as i64 * 1_000_000;
            runs.execute(rusqlite::params![
                uuid::Uuid::now_v7().to_string(),
                status,
                at,
                i32::from(failed),
                failed.then_some("boom"),
            ])?;
            history.execute(rusqlite::params![tx.last_insert_rowid(), at, status])?;
        }
    }
    tx.commit()?;
    Ok(DateTime::from_timestamp_nanos(first + 2000))
}

/// With many old runs in the registry: the start latency while a cleanup
/// removes them all (baseline: the same without it), and listing the
/// newest failed runs (baseline: the newest runs of any status).
async fn retention_figures(
    sizes: &Sizes,
    dir: &std::path::Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let count = sizes.retained;
    let path = dir.join("retention.db");
    let filling = path.clone();
    let first = tokio::task::spawn_blocking(move || old_runs_copy(&filling, count)).await??;
    let registry = RunRegistry::open_sqlite(&path)?;

    let list = async |filter: RunFilter| -> anyhow::Result<Duration> {
        let mut times = Vec::new();
        for _ in 0..30 {
            let begin = Instant::now();
            let listed = registry.list_summaries(&filter).await?;
            times.push(begin.elapsed());
            anyhow::ensure!(listed.len() == 100, "listed {}", listed.len());
        }
        times.sort();
        Ok(percentile(&times, 0.5))
    };
    let failed = list(RunFilter {
        statuses: vec![modrun::RunStatus::Failed],
        limit: Some(100),
        ..RunFilter::default()
    })
    .await?;
    let any = list(RunFilter {
        limit: Some(100),
        ..RunFilter::default()
    })
    .await?;
    rows.push(Row::measured(
        &format!("list newest 100 failed of {count} runs (0.1% failed), ms"),
        failed.as_secs_f64() * 1e3,
        any.as_secs_f64() * 1e3,
        3,
        "<= 2 x (baseline: newest 100 of any status)",
    ));

    let manager = BackgroundTaskManager::new(registry.clone());
    let starts = async |until: Option<&tokio::task::JoinHandle<modrun::Result<usize>>>| {
        let mut times = Vec::new();
        while times.len() < 2000 && until.is_none_or(|cleanup| !cleanup.is_finished()) {
            let begin = Instant::now();
            manager
                .start_task(Run::new("bench", "Bench"), async {})
                .await
                .expect("start");
            times.push(begin.elapsed());
            if until.is_none() && times.len() >= 1000 {
                break;
            }
        }
        times
    };
    let mut quiet = starts(None).await;
    let cleaner = registry.clone();
    let began = Instant::now();
    // The oldest `cleaned` runs ended before this; the rest after.
    let cutoff = first + chrono::Duration::milliseconds(sizes.cleaned as i64);
    let age = (Utc::now() - cutoff).to_std()?;
    let cleanup = tokio::spawn(async move {
        cleaner
            .cleanup(&modrun::registry::Cleanup::older_than(age))
            .await
    });
    let mut during = starts(Some(&cleanup)).await;
    let removed = cleanup.await??;
    let took = began.elapsed();
    anyhow::ensure!(
        removed.abs_diff(sizes.cleaned) <= 10,
        "removed {removed} of {}",
        sizes.cleaned
    );
    anyhow::ensure!(
        during.len() >= 50,
        "only {} starts during the cleanup",
        during.len()
    );
    rows.push(Row::p99_ms(
        &format!("start p99 during a cleanup of {removed} runs, ms"),
        &mut during,
        &mut quiet,
        3,
        "<= 2 x (baseline: the same without a cleanup)",
    ));
    rows.push(Row::measured(
        "  runs removed per second by that cleanup",
        removed as f64 / took.as_secs_f64(),
        removed as f64 / took.as_secs_f64(),
        0,
        "(reported)",
    ));
    manager.wait_all().await;
    Ok(())
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}

async fn wasm_figures(
    sizes: &Sizes,
    dir: &std::path::Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let plugins = bench_plugins()?;
    let hello = plugins.join("hello.wasm");
    let calls = sizes.wasm_calls;
    let config = modrun::HostConfig::default();

    for sequential in [true, false] {
        let shape = if sequential {
            "sequential"
        } else {
            "all cores"
        };
        let producers = if sequential { 1 } else { PRODUCERS };
        let bare =
            bare_wasmtime_per_second(&hello, config.wasmtime_config(), calls, sequential).await?;
        let memory =
            modrun_runs_per_second(&plugins, vec![RunRegistry::in_memory()], calls, producers)
                .await?;
        let db = dir.join(format!("wasm-{shape}.db").replace(' ', "-"));
        let sqlite = modrun_runs_per_second(
            &plugins,
            vec![RunRegistry::open_sqlite(db)?],
            calls,
            producers,
        )
        .await?;
        let wasm_goal = ">= 0.6 x bare wasmtime (instantiate+call)";
        let row = |registry: &str, rate: f64, baseline: f64, goal| {
            Row::measured(
                &format!("hello runs/s, {registry}, {shape}"),
                rate,
                baseline,
                0,
                goal,
            )
        };
        rows.push(row("in-memory", memory, bare, wasm_goal));
        if !sequential {
            rows.push(row("SQLite", sqlite, bare, wasm_goal));
            continue;
        }
        // One run at a time is measured against what no SQLite registry
        // can beat, each commit as cheap as SQLite makes it.
        let (ceiling, commit_row) = one_at_a_time_ceiling("SQLite", bare, raw_commit_seconds(dir)?);
        rows.push(row(
            "SQLite",
            sqlite,
            ceiling,
            ">= 0.8 x bare run + 2 raw SQLite commits",
        ));
        rows.push(Row::measured(
            "  ceiling: bare run + 2 raw SQLite commits, runs/s",
            ceiling,
            bare,
            0,
            "(reported: the most a durable SQLite run can reach)",
        ));
        rows.push(commit_row);
    }
    cancel_latency(&plugins, rows).await?;
    sleeping_run_memory(&plugins, sizes, rows).await?;
    Ok(())
}

/// What no durable registry can beat one run at a time, in runs/s: the
/// bare run (`bare` runs/s) plus the two commits the durability contract
/// waits for (the run before its id is handed out, its end before anyone
/// is told), each a raw commit of `store` taking `commit` seconds. With
/// it, the row that reports that raw commit against one bare run.
fn one_at_a_time_ceiling(store: &str, bare: f64, commit: f64) -> (f64, Row) {
    let commit_row = Row::measured(
        &format!("  one raw {store} commit (run + history rows), us"),
        commit * 1e6,
        1e6 / bare,
        1,
        "(reported; baseline: one bare run, us)",
    );
    (1.0 / (1.0 / bare + 2.0 * commit), commit_row)
}

/// The cheapest durable record of a new run SQLite offers, in seconds: on
/// the calling thread (no writer thread, no wake-ups), in WAL mode with
/// `synchronous = NORMAL` as modrun opens it, insert a run row and its
/// first history row on modrun's schema and commit.
fn raw_commit_seconds(dir: &std::path::Path) -> anyhow::Result<f64> {
    let path = dir.join("raw-commit.db");
    // modrun creates the file with its schema, in WAL mode (which stays).
    drop(RunRegistry::open_sqlite(&path)?);
    let conn = rusqlite::Connection::open(&path)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let commits = 2_000;
    let begin = Instant::now();
    for index in 0..commits {
        let tx = conn.unchecked_transaction()?;
        tx.prepare_cached(
            "INSERT INTO runs (run_id, module_id, module_name, status, created_at, parameters, \
             history_len) VALUES (?1, 'hello', 'Hello', 'queued', ?2, '{}', 1)",
        )?
        .execute(rusqlite::params![uuid::Uuid::now_v7().to_string(), index])?;
        tx.prepare_cached(
            "INSERT INTO run_history (run, seq, status, at) VALUES (?1, 0, 'queued', ?2)",
        )?
        .execute(rusqlite::params![tx.last_insert_rowid(), index])?;
        tx.commit()?;
    }
    Ok(begin.elapsed().as_secs_f64() / f64::from(commits))
}

/// Latency from `cancel` to `Cancelled` recorded, for each of 100 guests
/// spinning at once; baseline: cancelling 100 idle (awaiting) plain tasks.
async fn cancel_latency(plugins: &std::path::Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(plugins.join("spin.wasm"), dir.path().join("spin.wasm"))?;
    let host = modrun::ModuleHost::new(modrun::HostConfig::default())?;
    host.load_dir(dir.path()).await?;
    let manager = BackgroundTaskManager::new(RunRegistry::in_memory());
    let runner = modrun::ModuleRunner::new(host, manager.clone());

    let mut spinning = Vec::new();
    for _ in 0..100 {
        spinning.push(runner.start("spin", serde_json::json!({})).await?.into_id());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while manager
        .registry()
        .runs_by_status(modrun::RunStatus::Running)
        .await?
        .len()
        < 100
    {
        anyhow::ensure!(Instant::now() < deadline, "spinning runs did not all start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let spin_latencies = time_cancels(spinning, move |run_id| {
        let runner = runner.clone();
        async move { runner.cancel(&run_id).await }
    })
    .await?;
    let stop_begin = Instant::now();
    manager.wait_all().await;
    let all_stopped = stop_begin.elapsed();

    let idle_manager = BackgroundTaskManager::new(RunRegistry::in_memory());
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(
            idle_manager
                .start_task(Run::new("idle", "Idle"), std::future::pending::<()>())
                .await?
                .into_id(),
        );
    }
    let manager = idle_manager.clone();
    let idle_latencies = time_cancels(idle, move |run_id| {
        let manager = manager.clone();
        async move { manager.cancel_task(&run_id).await }
    })
    .await?;
    idle_manager.wait_all().await;
    let p99 = percentile(&spin_latencies, 0.99);
    let idle_p99 = percentile(&idle_latencies, 0.99);
    rows.push(Row {
        name: "cancel spinning guest -> Cancelled, p99 us (100)".into(),
        value: format!("{:.1}", p99.as_secs_f64() * 1e6),
        baseline: format!("{:.1}", idle_p99.as_secs_f64() * 1e6),
        ratio: p99.as_secs_f64() / idle_p99.as_secs_f64(),
        goal: "<= 1000 us (baseline: idle plain tasks)",
    });
    rows.push(Row {
        name: "  p50 us".into(),
        value: format!(
            "{:.1}",
            percentile(&spin_latencies, 0.5).as_secs_f64() * 1e6
        ),
        baseline: format!(
            "{:.1}",
            percentile(&idle_latencies, 0.5).as_secs_f64() * 1e6
        ),
        ratio: percentile(&spin_latencies, 0.5).as_secs_f64()
            / percentile(&idle_latencies, 0.5).as_secs_f64(),
        goal: "",
    });
    rows.push(Row {
        name: "  all 100 guests stopped after last cancel, ms".into(),
        value: format!("{:.2}", all_stopped.as_secs_f64() * 1e3),
        baseline: "-".into(),
        ratio: f64::NAN,
        goal: "(reported)",
    });
    Ok(())
}

/// Cancels each run, one after another, from a task on the runtime's
/// workers (as a request handler would); returns the latencies, sorted.
async fn time_cancels<F, Fut>(run_ids: Vec<String>, cancel: F) -> anyhow::Result<Vec<Duration>>
where
    F: Fn(String) -> Fut + Send + 'static,
    Fut: Future<Output = modrun::Result<bool>> + Send,
{
    let mut latencies = tokio::spawn(async move {
        let mut latencies = Vec::new();
        for run_id in run_ids {
            let begin = Instant::now();
            assert!(cancel(run_id).await.expect("cancel"), "the run was active");
            latencies.push(begin.elapsed());
        }
        latencies
    })
    .await?;
    latencies.sort();
    Ok(latencies)
}

/// Resident memory per in-flight `countdown` run (sleeping in WASI), guest
/// memory included; baseline: the same number of plain sleeping tasks.
async fn sleeping_run_memory(
    plugins: &std::path::Path,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let count = sizes.sleeping_runs;
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        plugins.join("countdown.wasm"),
        dir.path().join("countdown.wasm"),
    )?;
    let config = modrun::HostConfig {
        max_instances: u32::try_from(count)? + 16,
        ..modrun::HostConfig::default()
    };
    let host = modrun::ModuleHost::new(config)?;
    host.load_dir(dir.path()).await?;

    let plain = BackgroundTaskManager::new(RunRegistry::in_memory());
    let before = resident_bytes()?;
    for _ in 0..count {
        plain
            .start_task(
                Run::new("sleeper", "Sleeper"),
                tokio::time::sleep(Duration::from_secs(600)),
            )
            .await?;
    }
    let plain_bytes = (resident_bytes()? - before) / count as f64;

    let manager = BackgroundTaskManager::new(RunRegistry::in_memory());
    let runner = modrun::ModuleRunner::new(host, manager.clone());
    let before = resident_bytes()?;
    for _ in 0..count {
        runner
            .start(
                "countdown",
                serde_json::json!({"seconds": 600, "step_ms": 60000}),
            )
            .await?;
    }
    // Every run has logged its start: all are inside the guest, sleeping.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = manager
            .registry()
            .runs_by_status(modrun::RunStatus::Running)
            .await?
            .len();
        if running == count {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {running} of {count} runs started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_run = (resident_bytes()? - before) / count as f64;
    manager.shutdown(Duration::ZERO).await?;
    plain.shutdown(Duration::ZERO).await?;
    rows.push(Row {
        name: "resident memory per sleeping countdown run, KB".into(),
        value: format!("{:.1}", per_run / 1024.0),
        baseline: format!("{:.1}", plain_bytes / 1024.0),
        ratio: per_run / plain_bytes,
        goal: "<= 100 KB, guest memory included (baseline: plain task's heap)",
    });
    Ok(())
}

/// One write at a time, each waiting for its commit: the latency a lone
/// caller sees. Baseline: the same writes to the in-memory registry.
async fn commit_latency(dir: &std::path::Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let writes = 2_000;
    let time = |registry: RunRegistry| async move {
        let begin = Instant::now();
        for _ in 0..writes {
            registry
                .add_run(&Run::new("lone", "Lone"))
                .await
                .expect("add");
        }
        begin.elapsed().as_secs_f64() * 1e6 / writes as f64
    };
    let sqlite = time(RunRegistry::open_sqlite(dir.join("lone.db"))?).await;
    let memory = time(RunRegistry::in_memory()).await;
    rows.push(Row::measured(
        "one awaited SQLite write, sequential, us",
        sqlite,
        memory,
        1,
        "(reported; baseline: in-memory)",
    ));
    Ok(())
}

/// `component` with a custom section appended: the same behaviour, another
/// content hash (and so another cache entry).
fn variant(component: &[u8], index: usize) -> Vec<u8> {
    fn leb128(mut value: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"modrun-bench";
    let payload = index.to_string();
    let mut section = Vec::new();
    leb128(name.len(), &mut section);
    section.extend_from_slice(name);
    section.extend_from_slice(payload.as_bytes());
    let mut out = component.to_vec();
    out.push(0);
    leb128(section.len(), &mut out);
    out.extend_from_slice(&section);
    out
}

async fn reload_figures(sizes: &Sizes, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let plugins = bench_plugins()?;
    let versions = [
        std::fs::read(plugins.join("countdown.wasm"))?,
        std::fs::read(plugins.join("countdown_v2.wasm"))?,
    ];
    let cache = tempfile::tempdir()?;
    let config = || modrun::HostConfig {
        cache_dir: Some(cache.path().join("compiled")),
        ..modrun::HostConfig::default()
    };

    // Reload latency: a new version renamed into place, until a run starts on it.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("countdown.wasm");
    std::fs::write(&path, &versions[0])?;
    let host = modrun::ModuleHost::new(config())?;
    host.load_dir(dir.path()).await?;
    let _reloader = host.watch(dir.path(), modrun::module::DEFAULT_DEBOUNCE)?;
    let runner = modrun::ModuleRunner::new(
        host.clone(),
        BackgroundTaskManager::new(RunRegistry::in_memory()),
    );
    let mut watched = Vec::new();
    for swap in 1..=20 {
        let bytes = &versions[swap % 2];
        let partial = dir.path().join(".countdown.wasm.partial");
        std::fs::write(&partial, bytes)?;
        let mut events = host.subscribe();
        let begin = Instant::now();
        std::fs::rename(&partial, &path)?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.recv()).await?? {
                modrun::module::ReloadEvent::Loaded { .. } => break,
                modrun::module::ReloadEvent::Failed { error, .. } => anyhow::bail!("{error}"),
                _ => {}
            }
        }
        let run_id = runner
            .start("countdown", serde_json::json!({"seconds": 0}))
            .await?;
        watched.push(begin.elapsed());
        let run = runner.registry().get_run(&run_id).await?.expect("recorded");
        anyhow::ensure!(run.module_version == host.module("countdown").map(|m| m.content_hash));
    }
    runner.manager().wait_all().await;
    // Baseline: the same swaps loaded directly, no watcher or debounce.
    let mut direct = Vec::new();
    for swap in 1..=20 {
        std::fs::write(&path, &versions[swap % 2])?;
        let begin = Instant::now();
        host.load_file(&path).await?;
        direct.push(begin.elapsed());
    }
    watched.sort();
    direct.sort();
    let (p95, direct_p95) = (percentile(&watched, 0.95), percentile(&direct, 0.95));
    rows.push(Row {
        name: "reload: rename -> first run on new version, p95 ms".into(),
        value: format!("{:.1}", p95.as_secs_f64() * 1e3),
        baseline: format!("{:.1}", direct_p95.as_secs_f64() * 1e3),
        ratio: p95.as_secs_f64() / direct_p95.as_secs_f64(),
        goal: "<= 250 ms, debounce included (baseline: direct load_file)",
    });

    // Cold start: distinct modules, first with an empty cache, then again.
    let modules = sizes.cold_modules;
    let hello = std::fs::read(plugins.join("hello.wasm"))?;
    let dirs: Vec<tempfile::TempDir> = (0..modules)
        .map(|index| {
            let dir = tempfile::tempdir()?;
            std::fs::write(dir.path().join("hello.wasm"), variant(&hello, index))?;
            Ok(dir)
        })
        .collect::<anyhow::Result<_>>()?;
    let cold_start = |host: modrun::ModuleHost| {
        let dirs: Vec<std::path::PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
        async move {
            let begin = Instant::now();
            let loads = dirs.iter().map(|dir| host.load_dir(dir));
            for report in futures_util::future::join_all(loads).await {
                anyhow::ensure!(report?.failed.is_empty(), "a module failed to load");
            }
            anyhow::Ok((begin.elapsed(), host.compile_stats()))
        }
    };
    let fresh_cache = tempfile::tempdir()?;
    let with = |dir: &std::path::Path| modrun::HostConfig {
        cache_dir: Some(dir.join("compiled")),
        ..modrun::HostConfig::default()
    };
    let (uncached, stats) = cold_start(modrun::ModuleHost::new(with(fresh_cache.path()))?).await?;
    anyhow::ensure!(
        stats.compiled == modules as u64,
        "expected {modules} compiles: {stats:?}"
    );
    let (cached, stats) = cold_start(modrun::ModuleHost::new(with(fresh_cache.path()))?).await?;
    anyhow::ensure!(
        stats.cache_hits == modules as u64,
        "expected {modules} cache hits: {stats:?}"
    );
    rows.push(Row {
        name: format!("cold start, {modules} modules, with cache, ms per module"),
        value: format!("{:.2}", cached.as_secs_f64() * 1e3 / modules as f64),
        baseline: format!("{:.2}", uncached.as_secs_f64() * 1e3 / modules as f64),
        ratio: cached.as_secs_f64() / uncached.as_secs_f64(),
        goal: "<= 1 ms per module (baseline: same, compiling)",
    });
    Ok(())
}

/// Runs of `hello` started over HTTP on loopback until all are `Completed`
/// (SQLite), against the library doing the same in this run; and the p99
/// latency of the start request.
async fn http_figures(
    sizes: &Sizes,
    dir: &std::path::Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let plugins = bench_plugins()?;
    let runs = sizes.wasm_calls;
    let library = modrun_runs_per_second(
        &plugins,
        vec![RunRegistry::open_sqlite(dir.join("http-library.db"))?],
        runs,
        PRODUCERS,
    )
    .await?;

    let modules = tempfile::tempdir()?;
    std::fs::copy(
        plugins.join("hello.wasm"),
        modules.path().join("hello.wasm"),
    )?;
    let host = modrun::ModuleHost::new(modrun::HostConfig::default())?;
    host.load_dir(modules.path()).await?;
    let limits = modrun::TaskLimits {
        max_concurrent: Some(64),
        max_queued: Some(100_000),
    };
    let manager =
        BackgroundTaskManager::with_limits(RunRegistry::open_sqlite(dir.join("http.db"))?, limits);
    let runner = modrun::ModuleRunner::new(host, manager.clone());
    let app = modrun::http::router(modrun::http::AppState::new(runner, None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let connections = 32;
    let begin = Instant::now();
    let load = load_generator(
        address,
        "/modules/hello/runs",
        r#"{"name":"Ada"}"#,
        connections,
        runs,
    );
    let mut latencies = tokio::task::spawn_blocking(move || load.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the load generator panicked"))??;
    manager.wait_all().await;
    let over_http = latencies.len() as f64 / begin.elapsed().as_secs_f64();
    latencies.sort();
    rows.push(Row::measured(
        "hello runs/s over HTTP, SQLite, start->completed",
        over_http,
        library,
        0,
        ">= 0.5 x the library (baseline: library, all cores)",
    ));
    rows.push(Row {
        name: "  p99 latency of the start request, ms".into(),
        value: format!("{:.2}", percentile(&latencies, 0.99).as_secs_f64() * 1e3),
        baseline: format!("{:.2}", percentile(&latencies, 0.5).as_secs_f64() * 1e3),
        ratio: percentile(&latencies, 0.99).as_secs_f64()
            / percentile(&latencies, 0.5).as_secs_f64(),
        goal: "(reported; baseline: p50)",
    });
    Ok(())
}

/// A small HTTP/1.1 load generator on a thread of its own (one core's worth
/// of event loop, as `wrk` or `oha` would be): `connections` keep-alive
/// connections, each POSTing `body` to `path` one request after another,
/// `requests` in all. Every answer must be 202. Returns each request's latency.
fn load_generator(
    address: std::net::SocketAddr,
    path: &str,
    body: &str,
    connections: usize,
    requests: usize,
) -> std::thread::JoinHandle<anyhow::Result<Vec<Duration>>> {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let request = std::sync::Arc::new(request);
            let clients: Vec<_> = (0..connections)
                .map(|client| {
                    let request = request.clone();
                    let count =
                        requests / connections + usize::from(client < requests % connections);
                    tokio::spawn(async move { keep_alive_client(address, &request, count).await })
                })
                .collect();
            let mut latencies = Vec::with_capacity(requests);
            for client in clients {
                latencies.extend(client.await??);
            }
            Ok(latencies)
        })
    })
}

/// Sends `request` `count` times on one connection, reading each response
/// (headers and a `Content-Length` body) before the next.
async fn keep_alive_client(
    address: std::net::SocketAddr,
    request: &[u8],
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let mut buffer = Vec::with_capacity(4096);
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let sent = Instant::now();
        stream.write_all(request).await?;
        let (head_end, body_length) = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buffer[..end])?;
                let status = head.split(' ').nth(1).unwrap_or_default();
                anyhow::ensure!(status == "202", "start refused: {head}");
                let length = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .ok_or_else(|| anyhow::anyhow!("no Content-Length in {head}"))?;
                break (end + 4, length);
            }
            anyhow::ensure!(stream.read_buf(&mut buffer).await? > 0, "server closed");
        };
        while buffer.len() < head_end + body_length {
            anyhow::ensure!(stream.read_buf(&mut buffer).await? > 0, "server closed");
        }
        buffer.drain(..head_end + body_length);
        latencies.push(sent.elapsed());
    }
    Ok(latencies)
}

/// A PostgreSQL registry for the benchmarks in a fresh schema, as node `node`.
async fn postgres_registry(url: &str, schema: &str, node: &str) -> anyhow::Result<RunRegistry> {
    let options = modrun::registry::PostgresOptions {
        schema: schema.to_owned(),
        node: node.to_owned(),
        ..modrun::registry::PostgresOptions::default()
    };
    Ok(RunRegistry::new(
        modrun::registry::PostgresStore::connect(url, options).await?,
    ))
}

/// Hello end to end on PostgreSQL (durable commits), against the raw SQL
/// ceiling measured on the same server: insert, claim and complete with
/// history, 50 runs per statement, from 8 connections.
async fn postgres_figures(sizes: &Sizes, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!(
            "postgres rows skipped: set DATABASE_URL=postgres://user@host:port/db to run them"
        );
        return Ok(());
    };
    let schema = format!("bench_{}", uuid::Uuid::now_v7().simple());
    // The raw figures write modrun's tables in a schema of their own, and
    // so does the burst (fresh tables, as a new deployment has them).
    let raw_schema = format!("{schema}_raw");
    let measured = postgres_figures_in(&url, &schema, &raw_schema, sizes, rows).await;
    // The database is the user's: nothing of the benchmark is left in it.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; DROP SCHEMA IF EXISTS {raw_schema} CASCADE; \
             DROP SCHEMA IF EXISTS {schema}_burst CASCADE; \
             DROP SCHEMA IF EXISTS {schema}_stored CASCADE"
        ))
        .await?;
    measured
}

/// [`postgres_figures`] in the schemas `schema` (modrun's, and with
/// `_burst` after it, the burst's) and `raw_schema` (the raw SQL's).
async fn postgres_figures_in(
    url: &str,
    schema: &str,
    raw_schema: &str,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let plugins = bench_plugins()?;
    let calls = sizes.wasm_calls;
    let ceiling = raw_postgres_runs_per_second(url, raw_schema, calls.max(5_000)).await?;
    let mut one_node = 0.0;
    for nodes in [1, 2] {
        let mut registries = Vec::new();
        for index in 0..nodes {
            registries.push(postgres_registry(url, schema, &format!("bench-{index}")).await?);
        }
        let rate = modrun_runs_per_second(&plugins, registries, calls, PRODUCERS).await?;
        if nodes == 1 {
            one_node = rate;
        }
        rows.push(Row::measured(
            &format!("hello runs/s, PostgreSQL, all cores, {nodes} node(s)"),
            rate,
            ceiling,
            0,
            ">= 0.5 x raw SQL ceiling (insert+claim+complete, 50/statement)",
        ));
    }
    let stored = &format!("{schema}_stored");
    let registry = postgres_registry(url, stored, "bench-stored").await?;
    add_ended_runs(url, stored, "bench-stored", sizes.ended_on_node).await?;
    let rate = modrun_runs_per_second(&plugins, vec![registry], calls, PRODUCERS).await?;
    rows.push(Row::measured(
        &format!(
            "  the same, the node having ended {}k runs before",
            sizes.ended_on_node / 1000
        ),
        rate,
        one_node,
        0,
        ">= 0.8 x (baseline: fresh tables, the row above)",
    ));
    // A burst on fresh tables: many more callers than the node records
    // as they come, so that runs wait queued and each claim finds
    // thousands of them, planned while the table was still empty.
    let burst = modrun_runs_per_second(
        &plugins,
        vec![postgres_registry(url, &format!("{schema}_burst"), "bench-burst").await?],
        calls,
        BURST_PRODUCERS,
    )
    .await?;
    rows.push(Row::measured(
        &format!("hello runs/s, PostgreSQL, {BURST_PRODUCERS} callers at once, 1 node"),
        burst,
        ceiling,
        0,
        ">= 0.5 x raw SQL ceiling (insert+claim+complete, 50/statement)",
    ));
    let bare = bare_wasmtime_per_second(
        &plugins.join("hello.wasm"),
        modrun::HostConfig::default().wasmtime_config(),
        calls / 4,
        true,
    )
    .await?;
    let commit = raw_postgres_commit_seconds(url, raw_schema).await?;
    let sequential = modrun_runs_per_second(
        &plugins,
        vec![postgres_registry(url, schema, "bench-sequential").await?],
        calls / 4,
        1,
    )
    .await?;
    let (one_at_a_time, commit_row) = one_at_a_time_ceiling("PostgreSQL", bare, commit);
    rows.push(Row::measured(
        "hello runs/s, PostgreSQL, sequential",
        sequential,
        one_at_a_time,
        0,
        ">= 0.8 x bare run + 2 raw PostgreSQL commits",
    ));
    rows.push(commit_row);
    claim_latency(url, schema, &plugins, rows).await?;
    cross_node_cancel(url, schema, &plugins, rows).await?;
    lost_node_settled(url, schema, sizes.lease, rows).await
}

/// Records `count` runs that node `node` executed and ended, in the
/// schema `schema`, as the node's own statements leave them until the
/// table is next vacuumed: each started as `Running` for the node, then
/// updated to `Completed` (the ended versions beside the dead ones).
async fn add_ended_runs(url: &str, schema: &str, node: &str, count: usize) -> anyhow::Result<()> {
    let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!("SET search_path = {schema}"))
        .await?;
    let count = i64::try_from(count)?;
    // One transaction: the node never sees runs it holds and does not know.
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO runs (run_id, module_id, module_name, status, created_at, started_at, \
         parameters, history_len, node, attempt) \
         SELECT gen_random_uuid()::text, 'hello', 'Hello', 'running', g, g, '{}', 2, $1, 1 \
         FROM generate_series(1, $2::bigint) g",
        &[&node, &count],
    )
    .await?;
    tx.execute(
        "UPDATE runs SET status = 'completed', completed_at = created_at + 1, \
         history_len = 3 WHERE node = $1",
        &[&node],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// How long after a node dies (no goodbye: its heartbeats just stop) its
/// running runs are settled by another node, against the lease.
async fn lost_node_settled(
    url: &str,
    schema: &str,
    lease: Duration,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let node = |name: &str| modrun::registry::PostgresOptions {
        schema: schema.to_owned(),
        node: name.to_owned(),
        lease,
        ..modrun::registry::PostgresOptions::default()
    };
    let connect = |name: &str| modrun::registry::PostgresStore::connect(url, node(name));
    let doomed = RunRegistry::new(connect("bench-doomed").await?);
    let rescuer = RunRegistry::new(connect("bench-rescuer").await?);
    let mut runs = Vec::new();
    for _ in 0..50 {
        let run = modrun::Run::new("countdown", "Countdown");
        doomed.add_run(&run).await?;
        doomed
            .transition(&modrun::Transition::running(&run.run_id))
            .await?;
        runs.push(run.run_id);
    }
    doomed.flush().await?;
    drop(doomed);
    let begin = Instant::now();
    let deadline = begin + lease * 3;
    loop {
        let mut settled = 0;
        for run_id in &runs {
            let run = rescuer.get_run(run_id).await?;
            if run.is_some_and(|run| run.status.is_terminal()) {
                settled += 1;
            }
        }
        if settled == runs.len() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the lost node's runs were not settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rows.push(Row::measured(
        &format!(
            "lost node's 50 runs settled, s (lease {} s)",
            lease.as_secs()
        ),
        begin.elapsed().as_secs_f64(),
        lease.as_secs_f64(),
        1,
        "<= 40 s with the default 30 s lease (baseline: the lease)",
    ));
    Ok(())
}

/// Latency from a start on node A, which has no room, to the run's
/// `Running` on node B, which claims it from the queue (A's insert wakes
/// B by NOTIFY); baseline: a start on B itself, which has room and claims
/// the run in the write that records it. One run at a time: an idle
/// cluster. Then runs A queues for later: from when each is due to its
/// `Running` on B (woken by A's announcement of when), against the claim
/// latency.
async fn claim_latency(
    url: &str,
    schema: &str,
    plugins: &std::path::Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for name in ["hello.wasm", "countdown.wasm"] {
        std::fs::copy(plugins.join(name), dir.path().join(name))?;
    }
    let node = async |name: &str, max_concurrent| -> anyhow::Result<modrun::ModuleRunner> {
        let host = modrun::ModuleHost::new(modrun::HostConfig::default())?;
        host.load_dir(dir.path()).await?;
        let limits = modrun::TaskLimits {
            max_concurrent: Some(max_concurrent),
            max_queued: None,
        };
        let registry = postgres_registry(url, schema, name).await?;
        Ok(modrun::ModuleRunner::new(
            host,
            BackgroundTaskManager::with_limits(registry, limits),
        ))
    };
    let (full, idle) = (node("claim-full", 1).await?, node("claim-idle", 8).await?);
    let claimers = [full.claim_from_queue()?, idle.claim_from_queue()?];
    // A's one slot is taken for the whole measurement.
    let long = full
        .start(
            "countdown",
            serde_json::json!({"seconds": 120, "step_ms": 100}),
        )
        .await?;
    let mut events = idle.registry().subscribe();
    let (mut claimed, mut at_once) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        claimed.push(start_to_running(&full, &mut events, Duration::ZERO).await?);
        at_once.push(start_to_running(&idle, &mut events, Duration::ZERO).await?);
    }
    // Runs queued for later on A: B wakes when each is due, told by the
    // database, rather than at its next poll.
    let mut later = Vec::new();
    for _ in 0..50 {
        later.push(start_to_running(&full, &mut events, Duration::from_millis(40)).await?);
    }
    full.cancel(&long).await?;
    for claimer in claimers {
        claimer.stop().await;
    }
    rows.push(Row::p99_ms(
        "claim latency, start -> Running on another node, p99 ms (200)",
        &mut claimed,
        &mut at_once,
        2,
        "<= 5 ms (baseline: start on a node with room)",
    ));
    rows.push(Row::p99_ms(
        "run queued for later, due -> Running on another node, p99 ms (50)",
        &mut later,
        &mut claimed,
        2,
        "<= 10 ms (baseline: the claim latency above)",
    ));
    let p50 = |sorted: &[Duration]| percentile(sorted, 0.5).as_secs_f64() * 1e3;
    rows.push(Row::measured(
        "  p50 ms",
        p50(&later),
        p50(&claimed),
        2,
        "(reported; with a claimer's poll alone, up to 1,000 ms)",
    ));
    Ok(())
}

/// Latency from a cancel asked of node B to `Cancelled` seen on B, for
/// countdowns that node A executes (A hears it by NOTIFY, cancels, and
/// B hears the change by NOTIFY); baseline: the same cancel on node A.
async fn cross_node_cancel(
    url: &str,
    schema: &str,
    plugins: &std::path::Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        plugins.join("countdown.wasm"),
        dir.path().join("countdown.wasm"),
    )?;
    let a = postgres_registry(url, schema, "cancel-a").await?;
    let b = postgres_registry(url, schema, "cancel-b").await?;
    let host = modrun::ModuleHost::new(modrun::HostConfig::default())?;
    host.load_dir(dir.path()).await?;
    let runner = modrun::ModuleRunner::new(host, BackgroundTaskManager::new(a.clone()));
    let mut requests = a
        .take_cancel_requests()
        .ok_or_else(|| anyhow::anyhow!("cancel requests taken"))?;
    let owner = runner.clone();
    tokio::spawn(async move {
        while let Some(run_id) = requests.recv().await {
            let _ = owner.cancel(&run_id).await;
        }
    });
    let mut runs = Vec::new();
    for _ in 0..100 {
        runs.push(
            runner
                .start(
                    "countdown",
                    serde_json::json!({"seconds": 60, "step_ms": 100}),
                )
                .await?,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.runs_by_status(modrun::RunStatus::Running).await?.len() < runs.len() {
        anyhow::ensure!(Instant::now() < deadline, "countdowns did not all start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let local = runs.split_off(50);
    let mut across = Vec::new();
    let mut events = b.subscribe();
    for run_id in &runs {
        let begin = Instant::now();
        anyhow::ensure!(b.request_cancel(run_id).await?.is_some(), "not active");
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), events.recv()).await??;
            if let modrun::registry::RunEvent::Status {
                run_id: id, change, ..
            } = event
                && id == *run_id
                && change.status == modrun::RunStatus::Cancelled
            {
                break;
            }
        }
        across.push(begin.elapsed());
    }
    let mut same = Vec::new();
    for run_id in &local {
        let begin = Instant::now();
        anyhow::ensure!(runner.cancel(run_id).await?, "not cancelled");
        same.push(begin.elapsed());
    }
    runner.manager().wait_all().await;
    rows.push(Row::p99_ms(
        "cross-node cancel -> Cancelled seen, p99 ms (50)",
        &mut across,
        &mut same,
        2,
        "<= 100 ms (baseline: cancel on the executing node)",
    ));
    Ok(())
}

/// How long a hello started on `on` takes to be `Running`, as `events`
/// (of the node that executes it) tell; with a `delay`, started not
/// before then, and counted from when it is due. Returns once it has
/// ended.
async fn start_to_running(
    on: &modrun::ModuleRunner,
    events: &mut tokio::sync::broadcast::Receiver<modrun::RunEvent>,
    delay: Duration,
) -> anyhow::Result<Duration> {
    let parameters = serde_json::json!({"name": "Ada"});
    // From its start, or from when it is due (a run queued for later).
    let begin = Instant::now() + delay;
    let options = if delay.is_zero() {
        modrun::StartOptions::new()
    } else {
        modrun::StartOptions::new().not_before(chrono::Utc::now() + delay)
    };
    let run_id = on.start_with("hello", parameters, &options).await?;
    let mut running = None;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv()).await??;
        if let modrun::RunEvent::Status {
            run_id: id, change, ..
        } = event
            && id == run_id
        {
            match change.status {
                modrun::RunStatus::Running => {
                    running = Some(Instant::now().saturating_duration_since(begin));
                }
                status if status.is_terminal() => break,
                _ => {}
            }
        }
    }
    running.ok_or_else(|| anyhow::anyhow!("{run_id} ended without running"))
}

/// The raw SQL ceiling: runs per second through insert, claim and complete
/// (each with its history rows), 50 runs per statement, one commit per
/// statement, from 8 connections, on modrun's own tables.
async fn raw_postgres_runs_per_second(
    url: &str,
    schema: &str,
    count: usize,
) -> anyhow::Result<f64> {
    // modrun creates the schema and its tables; the raw figures go without
    // its announcements of status changes (a trigger), as bare SQL would.
    drop(postgres_registry(url, schema, "bench-raw").await?);
    {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "ALTER TABLE {schema}.run_history DISABLE TRIGGER run_history_notify"
            ))
            .await?;
    }
    const BATCH: usize = 50;
    const CONNECTIONS: usize = 8;
    let batches = count.div_ceil(BATCH * CONNECTIONS);
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!("SET search_path = {schema}"))
            .await?;
        clients.push(client);
    }
    let begin = Instant::now();
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(worker, client)| {
            tokio::spawn(async move {
                let node = format!("raw-{worker}");
                let insert = client
                    .prepare(
                        "WITH i AS (INSERT INTO runs (run_id, module_id, module_name, status, \
                         created_at, parameters, history_len, node) \
                         SELECT gen_random_uuid()::text, 'hello', 'Hello', 'queued', \
                         $1::bigint + g, '{}', 1, NULL FROM generate_series(1, $2) g RETURNING id) \
                         INSERT INTO run_history (run, seq, status, at) \
                         SELECT id, 0, 'queued', $1::bigint FROM i",
                    )
                    .await?;
                let claim = client
                    .prepare(
                        "WITH next AS (SELECT id FROM runs WHERE status = 'queued' \
                         ORDER BY created_at, id LIMIT $2 FOR UPDATE SKIP LOCKED), \
                         c AS (UPDATE runs r SET status = 'running', node = $3, started_at = $1, \
                         history_len = r.history_len + 1 FROM next WHERE r.id = next.id \
                         RETURNING r.id, r.history_len) \
                         INSERT INTO run_history (run, seq, status, at) \
                         SELECT id, history_len - 1, 'running', $1 FROM c",
                    )
                    .await?;
                let complete = client
                    .prepare(
                        "WITH d AS (UPDATE runs SET status = 'completed', completed_at = $1, \
                         output = '\"Hello, Ada!\"', history_len = history_len + 1 \
                         WHERE node = $2 AND status = 'running' RETURNING id, history_len) \
                         INSERT INTO run_history (run, seq, status, at) \
                         SELECT id, history_len - 1, 'completed', $1 FROM d",
                    )
                    .await?;
                let batch = BATCH as i32;
                for _ in 0..batches {
                    let at = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
                    client.execute(&insert, &[&at, &batch]).await?;
                    client
                        .execute(&claim, &[&at, &(BATCH as i64), &node])
                        .await?;
                    client.execute(&complete, &[&at, &node]).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    Ok((batches * BATCH * CONNECTIONS) as f64 / begin.elapsed().as_secs_f64())
}

/// One durable commit of a run row and its first history row, in seconds.
async fn raw_postgres_commit_seconds(url: &str, schema: &str) -> anyhow::Result<f64> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!("SET search_path = {schema}"))
        .await?;
    let statement = client
        .prepare(
            "WITH i AS (INSERT INTO runs (run_id, module_id, module_name, status, created_at, \
             parameters, history_len) VALUES (gen_random_uuid()::text, 'hello', 'Hello', \
             'queued', $1, '{}', 1) RETURNING id) \
             INSERT INTO run_history (run, seq, status, at) SELECT id, 0, 'queued', $1 FROM i",
        )
        .await?;
    let commits = 1_000;
    let begin = Instant::now();
    for index in 0..commits {
        client.execute(&statement, &[&i64::from(index)]).await?;
    }
    Ok(begin.elapsed().as_secs_f64() / f64::from(commits))
}
