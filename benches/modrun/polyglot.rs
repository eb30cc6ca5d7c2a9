//! Plugins in Python and JavaScript beside the Rust `hello`: a run through
//! the library, what instantiation costs, and `modrun run` with a big guest
//! in the folder. The guests are `examples/polyglot`, built by `modrun
//! build`; a quick run skips these rows until they have been built once.

use std::path::{Path, PathBuf};
use std::time::Instant;

use modrun::{BackgroundTaskManager, HostConfig, ModuleHost, ModuleRunner, RunRegistry};
use sha2::{Digest, Sha256};

use super::{Bare, Row, bare_pre, bench_plugins, ensure_none_failed, median, target_dir};

/// The guests: module id, and the language the rows name.
const GUESTS: [(&str, &str); 2] = [("hello_py", "Python"), ("hello_js", "JavaScript")];

pub(super) async fn polyglot_figures(quick: bool, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = root.join("examples/polyglot");
    let installed = ["hello-py/.venv", "hello-js/node_modules"]
        .iter()
        .all(|dir| sources.join(dir).is_dir());
    if quick && !installed {
        eprintln!(
            "polyglot: skipped in a quick run until the guests have been built once: \
             modrun build --plugins examples/polyglot"
        );
        return Ok(());
    }
    let target = target_dir();
    let guests = target.join("bench-polyglot");
    modrun::module::build_plugins(&sources, &target.join("polyglot"), &guests)?;
    let rust = bench_plugins()?;
    let cache = target.join("bench-cache");
    let config = HostConfig {
        cache_dir: Some(cache.clone()),
        ..HostConfig::default()
    };

    let runs = if quick { 50 } else { 1000 };
    let rust_ms = run_ms(&rust.join("hello.wasm"), "hello", &config, runs * 5).await?;
    let rust_instantiate =
        instantiate_us(&rust.join("hello.wasm"), &config, &cache, runs * 5).await?;
    for (id, language) in GUESTS {
        let component = guests.join(format!("{id}.wasm"));
        rows.push(Row::measured(
            &format!("{language} hello, in-memory, sequential, ms/run"),
            run_ms(&component, id, &config, runs).await?,
            rust_ms,
            3,
            "<= 3 x the Rust hello (baseline)",
        ));
        rows.push(Row::measured(
            &format!("  {language} hello instantiation alone, us"),
            instantiate_us(&component, &config, &cache, runs).await?,
            rust_instantiate,
            0,
            "(reported; baseline: the Rust hello's)",
        ));
    }

    // `modrun run hello` with the cache warm, with and without an 18 MB
    // Python component in the same folder.
    let rust_only = tempfile::tempdir()?;
    let with_python = tempfile::tempdir()?;
    for dir in [rust_only.path(), with_python.path()] {
        std::fs::copy(rust.join("hello.wasm"), dir.join("hello.wasm"))?;
    }
    std::fs::copy(
        guests.join("hello_py.wasm"),
        with_python.path().join("hello_py.wasm"),
    )?;
    let data = tempfile::tempdir()?;
    let repeats = if quick { 3 } else { 11 };
    let wall = |plugins: &Path| -> anyhow::Result<f64> {
        let mut times = Vec::new();
        // The first warms the cache; the rest are measured.
        for attempt in 0..=repeats {
            let started = Instant::now();
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_modrun"))
                .args(["run", "hello", "name=Ada", "--in-memory", "--plugins"])
                .arg(plugins)
                .arg("--db")
                .arg(data.path().join("registry.db"))
                .output()?;
            anyhow::ensure!(out.status.success(), "modrun run hello failed: {out:?}");
            if attempt > 0 {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(median(&mut times))
    };
    let alone = wall(rust_only.path())?;
    let beside = wall(with_python.path())?;
    rows.push(Row::measured(
        "modrun run hello, warm cache, Python plugin beside, ms",
        beside,
        alone,
        0,
        "<= 500 ms (baseline: only Rust plugins)",
    ));
    Ok(())
}

/// One run of `id` at a time through the library, in memory, until each
/// is recorded `Completed`: ms per run.
async fn run_ms(
    component: &Path,
    id: &str,
    config: &HostConfig,
    count: usize,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(component, dir.path().join(format!("{id}.wasm")))?;
    let host = ModuleHost::new(config.clone())?;
    let report = host.load_dir(dir.path()).await?;
    anyhow::ensure!(report.failed.is_empty(), "{:?}", report.failed);
    let runner = ModuleRunner::new(host, BackgroundTaskManager::new(RunRegistry::in_memory()));
    let parameters = serde_json::json!({"name": "Ada"});
    // Warm: the instance slot and the memory image exist after the first.
    runner.start(id, parameters.clone()).await?;
    runner.manager().wait_all().await;
    let begin = Instant::now();
    for _ in 0..count {
        runner.start(id, parameters.clone()).await?;
        runner.manager().wait_all().await;
    }
    let took = begin.elapsed().as_secs_f64() * 1e3 / count as f64;
    ensure_none_failed(runner.registry(), id).await?;
    Ok(took)
}

/// Bare wasmtime on modrun's engine configuration: a fresh Store and an
/// instance of the component from an `InstancePre`, nothing called; mean
/// microseconds. The heap a guest's interpreter was initialised with is
/// mapped copy-on-write from the component's memory image, not copied.
async fn instantiate_us(
    component: &Path,
    config: &HostConfig,
    cache: &Path,
    count: usize,
) -> anyhow::Result<f64> {
    let engine =
        wasmtime::Engine::new(&config.wasmtime_config()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let component = precompiled(&engine, component, cache)?;
    let pre = bare_pre(&engine, &component)?;
    let instantiate = || async {
        let wasi = wasmtime_wasi::WasiCtx::builder().build();
        let table = wasmtime::component::ResourceTable::new();
        let mut store = wasmtime::Store::new(&engine, Bare { wasi, table });
        store.set_epoch_deadline(u64::MAX / 2);
        pre.instantiate_async(&mut store)
            .await
            .map(drop)
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    instantiate().await?;
    let begin = Instant::now();
    for _ in 0..count {
        instantiate().await?;
    }
    Ok(begin.elapsed().as_secs_f64() * 1e6 / count as f64)
}

/// The component compiled for `engine`, kept in the benchmark's own cache
/// (in the target directory) by content hash, so a run compiles it once.
fn precompiled(
    engine: &wasmtime::Engine,
    component: &Path,
    cache: &Path,
) -> anyhow::Result<wasmtime::component::Component> {
    let bytes = std::fs::read(component)?;
    let hash: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file: PathBuf = cache.join(format!("bench-{hash}.cwasm"));
    if !file.is_file() {
        let compiled = engine
            .precompile_component(&bytes)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::create_dir_all(cache)?;
        std::fs::write(&file, compiled)?;
    }
    // SAFETY: the file is this benchmark's own output, in the target
    // directory, written by the same wasmtime for the same configuration
    // (wasmtime checks both and refuses a mismatch).
    unsafe { wasmtime::component::Component::deserialize_file(engine, &file) }
        .map_err(|e| anyhow::anyhow!("{e}"))
}
