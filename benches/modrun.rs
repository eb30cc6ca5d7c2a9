//! modrun's benchmarks: one row per figure, each beside a baseline measured
//! in the same run, their ratio, and the goal.
//!
//! `cargo bench --bench modrun` for the full run, `cargo bench --bench modrun -- --quick`
//! for one under a minute (smaller counts; the same rows). Naming groups
//! (`throughput`, `status-change`, `memory`) runs only those.

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use modrun::{BackgroundTaskManager, Run, RunRegistry, Transition};

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

struct Sizes {
    tasks: usize,
    history: usize,
    changes: usize,
    in_flight: usize,
}

struct Row {
    name: &'static str,
    value: String,
    baseline: String,
    ratio: f64,
    goal: &'static str,
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let sizes = if quick {
        Sizes {
            tasks: 50_000,
            history: 100_000,
            changes: 20_000,
            in_flight: 100_000,
        }
    } else {
        Sizes {
            tasks: 300_000,
            history: 100_000,
            changes: 100_000,
            in_flight: 100_000,
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
    runtime.block_on(async {
        if wanted("throughput") {
            task_throughput(&sizes, dir.path(), &mut rows).await?;
        }
        if wanted("status-change") {
            status_change_cost(&sizes, dir.path(), &mut rows).await?;
        }
        if wanted("memory") {
            memory_per_task(&sizes, &mut rows).await?;
        }
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
    rows.push(Row {
        name: "tasks started->completed /s, in-memory registry",
        value: format!("{in_memory:.0}"),
        baseline: format!("{baseline:.0}"),
        ratio: in_memory / baseline,
        goal: ">= 200000/s (baseline: bare tokio spawn+join)",
    });

    let sqlite = BackgroundTaskManager::new(RunRegistry::open_sqlite(dir.join("throughput.db"))?);
    let on_disk = tasks_per_second(&sqlite, sizes.tasks).await;
    rows.push(Row {
        name: "tasks started->completed /s, SQLite registry",
        value: format!("{on_disk:.0}"),
        baseline: format!("{baseline:.0}"),
        ratio: on_disk / baseline,
        goal: ">= 50000/s (baseline: bare tokio spawn+join)",
    });
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
    rows.push(Row {
        name: "SQLite status change, us, 100k runs already stored",
        value: format!("{with_history:.2}"),
        baseline: format!("{baseline:.2}"),
        ratio: with_history / baseline,
        goal: "<= 10 us, ratio ~1 (baseline: empty registry)",
    });

    let empty = RunRegistry::in_memory();
    let baseline = change_cost_us(&empty, 0, sizes.changes).await?;
    let full = RunRegistry::in_memory();
    let with_history = change_cost_us(&full, sizes.history, sizes.changes).await?;
    rows.push(Row {
        name: "in-memory status change, us, 100k runs stored",
        value: format!("{with_history:.2}"),
        baseline: format!("{baseline:.2}"),
        ratio: with_history / baseline,
        goal: "ratio ~1 (baseline: empty registry)",
    });
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

    rows.push(Row {
        name: "host memory per in-flight task, bytes (100k)",
        value: format!("{total:.0}"),
        baseline: format!("{bare:.0}"),
        ratio: total / bare,
        goal: "<= 2048 B (baseline: bare parked tokio task)",
    });
    rows.push(Row {
        name: "  of which run record + history in registry, bytes",
        value: format!("{record:.0}"),
        baseline: format!("{total:.0}"),
        ratio: record / total,
        goal: "(split of the row above)",
    });
    Ok(())
}
