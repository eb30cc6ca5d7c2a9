use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use modrun::{BackgroundTaskManager, HostConfig, ModuleHost, ModuleRunner, RunRegistry, RunStatus};
use serde_json::{Value, json};

use crate::modules::runner_with;
use crate::server::Server;
use crate::support::{
    DEADLINE, built_plugins, plugins_dir, require_or_skip, test_host_config, wait_for_end,
};

/// Runs `abuse` once with `parameters` and returns the finished run.
async fn abuse(runner: &ModuleRunner, parameters: Value) -> modrun::Run {
    let run_id = runner.start("abuse", parameters).await.unwrap();
    wait_for_end(runner.registry(), &run_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_over_the_manifest_limit_fails_the_run_and_one_under_it_completes() {
    let (runner, _dir, _) = runner_with(&["abuse"], &[]).await;
    let over = abuse(&runner, json!({"mode": "output", "bytes": (1 << 20) + 1})).await;
    assert_eq!(over.status, RunStatus::Failed);
    let message = over.error_message.unwrap();
    assert!(
        message.contains("1048577 bytes of output, over its limit of 1 MiB")
            && message.contains("max_output_kib"),
        "{message}"
    );
    assert_eq!(over.output, None);

    let (runner, _dir, _) = runner_with(
        &["abuse"],
        &[("abuse", "[limits]\nmax_output_kib = 2048\n")],
    )
    .await;
    let under = abuse(&runner, json!({"mode": "output", "bytes": (1 << 20) + 1})).await;
    assert_eq!(
        under.status,
        RunStatus::Completed,
        "{:?}",
        under.error_message
    );
    assert_eq!(under.output.unwrap().as_str().unwrap().len(), (1 << 20) - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_error_message_is_cut() {
    let (runner, _dir, _) = runner_with(&["abuse"], &[]).await;
    let run = abuse(&runner, json!({"mode": "error", "bytes": 4 << 20})).await;
    assert_eq!(run.status, RunStatus::Failed);
    let message = run.error_message.unwrap();
    assert_eq!(
        message.len(),
        modrun::manager::MAX_ERROR_MESSAGE + " [cut]".len()
    );
    assert!(message.ends_with("eee [cut]"));
    let history = runner.registry().history(&run.run_id).await.unwrap();
    assert_eq!(history.last().unwrap().message.as_ref(), Some(&message));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_stored_between_0_and_1_and_never_as_minus_0() {
    let (runner, _dir, _) = runner_with(&["abuse"], &[]).await;
    for (reported, stored) in [
        (json!("inf"), 1.0),
        (json!("-inf"), 0.0),
        (json!("nan"), 0.0),
        (json!(7.5), 1.0),
        (json!(-3), 0.0),
        (json!(0.25), 0.25),
    ] {
        let run = abuse(&runner, json!({"mode": "progress", "fraction": reported})).await;
        assert_eq!(run.progress.unwrap().fraction, stored, "{reported}");
    }
    let mut events = runner.registry().subscribe();
    let run = abuse(&runner, json!({"mode": "progress", "fraction": "-0"})).await;
    let fraction = run.progress.unwrap().fraction;
    assert!(fraction == 0.0 && fraction.is_sign_positive());
    loop {
        let event = events.recv().await.unwrap();
        if let modrun::RunEvent::Progress { progress, .. } = &event {
            assert_eq!(
                serde_json::to_value(&event).unwrap()["progress"]["fraction"],
                json!(0.0)
            );
            assert!(progress.fraction.is_sign_positive());
            break;
        }
    }
}

/// A directory with a FIFO, a regular file and a place for links.
fn granted_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plain.txt"), "plain").unwrap();
    let fifo = std::ffi::CString::new(
        dir.path()
            .join("fifo")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the file.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    dir
}

fn grant(dir: &Path, extra: &str) -> String {
    format!(
        "[limits]\ntimeout_secs = 5\n[grants]\n{extra}\n[[grants.dirs]]\nhost = {:?}\nguest = \"/data\"\nwritable = true\n",
        dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_a_granted_directory_is_refused_not_waited_on() {
    let data = granted_dir();
    let manifest = grant(data.path(), "");
    let (runner, _dir, _) = runner_with(&["abuse"], &[("abuse", &manifest)]).await;
    // Should the open ever wait on the FIFO, a writer comes along later and
    // frees the host thread, so that this test fails instead of hanging.
    let fifo_path = data.path().join("fifo");
    std::thread::spawn(move || {
        std::thread::sleep(DEADLINE);
        let _ = std::fs::OpenOptions::new().write(true).open(fifo_path);
    });
    let started = Instant::now();
    let fifo = abuse(&runner, json!({"mode": "open", "path": "/data/fifo"})).await;
    assert_eq!(
        fifo.status,
        RunStatus::Completed,
        "{:?}",
        fifo.error_message
    );
    assert_eq!(
        fifo.output.as_ref().unwrap()["opened"],
        false,
        "{:?}",
        fifo.output
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the open waited"
    );
    let plain = abuse(&runner, json!({"mode": "open", "path": "/data/plain.txt"})).await;
    assert_eq!(plain.output.unwrap()["opened"], true);
    let dir = abuse(&runner, json!({"mode": "open", "path": "/data"})).await;
    assert_eq!(dir.output.unwrap()["opened"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbolic_links_in_a_granted_directory_need_the_manifest() {
    let data = granted_dir();
    // WASI refuses absolute targets; a relative one climbs out all the same
    // for whatever host tool follows the link.
    let target = "../../../../../../../../../../etc/passwd";
    let plant = json!({"mode": "symlink", "target": target, "link": "/data/passwd"});
    let manifest = grant(data.path(), "");
    let (runner, _dir, _) = runner_with(&["abuse"], &[("abuse", &manifest)]).await;
    let refused = abuse(&runner, plant.clone()).await;
    assert_eq!(refused.output.unwrap()["created"], false);
    assert!(std::fs::symlink_metadata(data.path().join("passwd")).is_err());

    let manifest = grant(data.path(), "symlinks = true");
    let (runner, _dir, _) = runner_with(&["abuse"], &[("abuse", &manifest)]).await;
    let allowed = abuse(&runner, plant).await;
    assert_eq!(allowed.output.unwrap()["created"], true);
    assert_eq!(
        std::fs::read_link(data.path().join("passwd")).unwrap(),
        Path::new(target)
    );
    let link = std::fs::symlink_metadata(data.path().join("passwd")).unwrap();
    assert!(link.file_type().is_symlink());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_manifest_limits_are_refused_at_load_and_starts_never_panic() {
    for (manifest, expected) in [
        (
            "[limits]\nmax_concurrent = 9223372036854775807\n",
            "max_concurrent must be from 1 to 10000",
        ),
        (
            "[limits]\nmax_output_kib = 999999999\n",
            "max_output_kib must be from 1 to 65536",
        ),
        ("[limits]\nmemory_mib = 18446744073709551615\n", ""),
    ] {
        let (runner, _dir, report) = runner_with(&["hello"], &[("hello", manifest)]).await;
        assert!(report.loaded.is_empty(), "{manifest}");
        assert!(
            report.failed[0].error.contains(expected),
            "{}",
            report.failed[0].error
        );
        assert!(runner.start("hello", json!({})).await.is_err());
    }
    let (runner, _dir, report) = runner_with(
        &["hello"],
        &[("hello", "[limits]\nmax_concurrent = 10000\n")],
    )
    .await;
    assert_eq!(report.loaded, ["hello"]);
    let run_id = runner.start("hello", json!({"name": "Ada"})).await.unwrap();
    assert_eq!(
        wait_for_end(runner.registry(), &run_id).await.status,
        RunStatus::Completed
    );
}

/// Loads `dir` with a host that refuses components over 1 MiB.
async fn load_small(dir: &Path) -> modrun::module::LoadReport {
    let host = ModuleHost::new(HostConfig {
        max_module_bytes: 1 << 20,
        ..test_host_config()
    })
    .unwrap();
    let loading = host.load_dir(dir);
    tokio::time::timeout(DEADLINE, loading)
        .await
        .expect("loading never waits on a file")
        .unwrap()
}

fn failure_of<'a>(report: &'a modrun::module::LoadReport, file: &str) -> &'a str {
    report
        .failed
        .iter()
        .find(|failure| failure.path.ends_with(file))
        .map_or_else(
            || panic!("{file} did not fail: {report:?}"),
            |f| f.error.as_str(),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugins_directory_loads_only_regular_files_unless_a_manifest_allows_a_link() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(
        built_plugins().join("hello.wasm"),
        outside.path().join("hello.wasm"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("hello.wasm"),
        dir.path().join("hello.wasm"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/proc/self/pagemap", dir.path().join("pagemap.wasm")).unwrap();
    let fifo = std::ffi::CString::new(
        dir.path()
            .join("fifo.wasm")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the file.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

    let report = load_small(dir.path()).await;
    assert!(report.loaded.is_empty(), "{report:?}");
    assert!(failure_of(&report, "hello.wasm").contains("symbolic link"));
    assert!(failure_of(&report, "pagemap.wasm").contains("symbolic link"));
    assert!(
        !report.failed.iter().any(|f| f.path.ends_with("fifo.wasm")),
        "a FIFO is no candidate"
    );

    for id in ["hello", "pagemap"] {
        std::fs::write(
            dir.path().join(format!("{id}.toml")),
            "[component]\nallow_symlink = true\n",
        )
        .unwrap();
    }
    let report = load_small(dir.path()).await;
    assert_eq!(report.loaded, ["hello"]);
    let pagemap = failure_of(&report, "pagemap.wasm");
    assert!(
        pagemap.contains("more than the limit of 1048576 bytes"),
        "{pagemap}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_runs_log_is_committed_before_shutdown_returns() {
    let plugins = plugins_dir(&["countdown"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let host = ModuleHost::new(test_host_config()).unwrap();
    host.load_dir(plugins.path()).await.unwrap();
    let registry = RunRegistry::open_sqlite(&db).unwrap();
    let manager = BackgroundTaskManager::new(registry.clone());
    let runner = ModuleRunner::new(host, manager.clone());
    let run_id = runner
        .start("countdown", json!({"seconds": 60, "step_ms": 10}))
        .await
        .unwrap()
        // Only the id: a handle keeps the registry (and its file) open.
        .into_id();
    let started = Instant::now();
    while registry
        .get_run(&run_id)
        .await
        .unwrap()
        .unwrap()
        .progress
        .is_none()
    {
        assert!(started.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = manager.shutdown(Duration::ZERO).await.unwrap();
    assert_eq!(report.cancelled, std::slice::from_ref(&run_id));
    assert_eq!(report.still_running, 0, "the cancelled guest stopped");
    drop((runner, manager, registry));

    // Read beside whatever still holds the file (the last handle may be
    // dropped on another thread a moment later): the log must be there.
    let cancelled_with_its_log = |run: modrun::Run| {
        assert_eq!(run.status, RunStatus::Cancelled);
        assert!(
            run.log
                .iter()
                .any(|entry| entry.message.starts_with("counting down")),
            "committed before shutdown returned: {:?}",
            run.log
        );
    };
    let reader = modrun::registry::SqliteReader::open(&db).unwrap();
    cancelled_with_its_log(reader.get(&run_id).unwrap().unwrap());
    let started = Instant::now();
    let reopened = loop {
        match RunRegistry::open_sqlite(&db) {
            Err(modrun::Error::RegistryInUse { .. }) if started.elapsed() < DEADLINE => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other.unwrap(),
        }
    };
    cancelled_with_its_log(reopened.get_run(&run_id).await.unwrap().unwrap());
}

/// A field of `/proc/<pid>/status`, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn a_progress_flood_leaves_the_servers_memory_bounded() {
    let plugins = plugins_dir(&["abuse", "hello"]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(plugins.path(), &data.path().join("registry.db"), &[]);
    let pid = server.child.id();
    let warm = server.start_run("hello", json!({"name": "warm"}));
    server.wait_status(&warm, "completed");
    let before = proc_status_kib(pid, "VmRSS:");

    let flood = server.start_run("abuse", json!({"mode": "progress", "count": 3_000_000}));
    // A start is served promptly meanwhile.
    let started = Instant::now();
    let hello = server.start_run("hello", json!({"name": "during"}));
    server.wait_status(&hello, "completed");
    // Before, a start waited 22 s behind such a flood.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a start took {:?}",
        started.elapsed()
    );
    // Three million host calls take a while in a debug build.
    server.wait_status_within(&flood, "completed", Duration::from_secs(120));
    let peak = proc_status_kib(pid, "VmHWM:");
    // Queued unawaited, 3 million reports took over a gigabyte.
    assert!(
        peak < before + 100 * 1024,
        "resident memory went from {before} KiB to a peak of {peak} KiB"
    );
    let (_, body) = server.get(&format!("/runs/{flood}"));
    assert_eq!(body["run"]["progress"]["fraction"], 0.5);
}

#[test]
fn a_log_flood_is_kept_in_the_run_and_sampled_in_the_servers_log() {
    let plugins = plugins_dir(&["abuse"]);
    let data = tempfile::tempdir().unwrap();
    let log_path = data.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let server = Server::start_logging_to(
        plugins.path(),
        &data.path().join("registry.db"),
        &[],
        Stdio::from(log),
    );
    let flood = server.start_run("abuse", json!({"mode": "log", "count": 200_000}));
    server.wait_status(&flood, "completed");
    let (_, body) = server.get(&format!("/runs/{flood}"));
    let kept = body["run"]["log"].as_array().unwrap();
    assert_eq!(
        kept.len(),
        1001,
        "the run's log keeps its cap and a truncation marker"
    );
    assert_eq!(server.terminate(), 0);

    let echoed = std::fs::read_to_string(&log_path).unwrap();
    let lines = echoed
        .lines()
        .filter(|line| line.contains("abusing the log"))
        .count();
    assert!((100..1000).contains(&lines), "{lines} lines echoed");
    assert!(
        echoed.contains("not echoed"),
        "no word of the lines not echoed"
    );
}

/// A core module whose memory a test writes and reads directly: one data
/// segment (so the memory has an image to be restored) on its second page.
const MEMORY_MODULE: &str = r#"
    (module
      (memory (export "memory") 48)
      (data (i32.const 65536) "the module's own data")
      (func (export "write") (param i32 i32) (i32.store (local.get 0) (local.get 1)))
      (func (export "read") (param i32) (result i32) (i32.load (local.get 0))))
"#;

/// Whether the kernel has a swap device or file in use (`/proc/swaps`
/// lists one under its header).
fn swap_is_on() -> bool {
    std::fs::read_to_string("/proc/swaps").is_ok_and(|swaps| swaps.lines().count() > 1)
}

/// The host's page size, in bytes.
fn page_size() -> usize {
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Whether the page at `address` of this process is swapped out, as
/// `/proc/self/pagemap` tells (bit 62 of its entry).
fn swapped_out(address: usize) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    pagemap
        .seek(SeekFrom::Start((address / page_size() * 8) as u64))
        .unwrap();
    let mut entry = [0; 8];
    pagemap.read_exact(&mut entry).unwrap();
    u64::from_le_bytes(entry) >> 62 & 1 == 1
}

/// The engine wipes a finished instance's slot before the next instance
/// takes it, also the pages the kernel swapped out in between: a fresh
/// instance reads only zeros and its own data, never what the last one in
/// its slot wrote. (Wasmtime's `PAGEMAP_SCAN` wipe skips such pages.)
#[test]
fn a_fresh_instance_never_reads_what_the_last_one_in_its_slot_wrote_before_a_swap() {
    if !swap_is_on() {
        require_or_skip::<()>("swap in use (`swapon`), to page a guest's memory out");
        return;
    }
    // Few slots (one for runs, the loading ones), so that the rounds below
    // come back to a slot once `WARM_SLOTS` of them are warm.
    let config = HostConfig {
        max_instances: 1,
        ..HostConfig::default()
    };
    let engine = wasmtime::Engine::new(&config.wasmtime_config()).unwrap();
    let module = wasmtime::Module::new(&engine, wat::parse_str(MEMORY_MODULE).unwrap()).unwrap();
    // In the image's page, on a page of zeros after it (both wiped in
    // place), and 2 MiB in (handed back to the kernel).
    let addresses = [65536 + 1024, 2 * 65536 + 1024, (2 << 20) + 1024];
    let image_word = u32::from_le_bytes(*b"the ") as i32;
    let mut bases = std::collections::HashSet::new();
    let (mut reused_after_swap, mut paged_out) = (0, 0);
    let mut last_swapped = None;
    for round in 0..4 * modrun::module::WARM_SLOTS as i32 {
        let mut store = wasmtime::Store::new(&engine, ());
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let write = instance
            .get_typed_func::<(i32, i32), ()>(&mut store, "write")
            .unwrap();
        let read = instance
            .get_typed_func::<i32, i32>(&mut store, "read")
            .unwrap();
        let memory = instance.get_memory(&mut store, "memory").unwrap();
        let base = memory.data_ptr(&store) as usize;
        if last_swapped == Some(base) {
            reused_after_swap += 1;
        }
        let image = read.call(&mut store, 65536).unwrap();
        assert_eq!(image, image_word, "round {round}: the image's data");
        for address in addresses {
            let seen = read.call(&mut store, address).unwrap();
            assert_eq!(
                seen, 0,
                "round {round}: a fresh instance read {seen:#x} at {address}, which an earlier \
                 instance in its slot wrote"
            );
        }
        for address in addresses {
            write.call(&mut store, (address, 0x5ec2e7 + round)).unwrap();
            // The kernel pages it out at once: the instance has written
            // it, and its slot has not been wiped yet.
            let page = (base + address as usize) / page_size() * page_size();
            unsafe { libc::madvise(page as *mut _, page_size(), libc::MADV_PAGEOUT) };
        }
        last_swapped = addresses
            .iter()
            .all(|&address| swapped_out(base + address as usize))
            .then_some(base);
        paged_out += usize::from(last_swapped.is_some());
        bases.insert(base);
        drop(store);
    }
    // Otherwise the test would have shown nothing.
    assert!(
        reused_after_swap > 0,
        "no slot was reused after its pages were swapped out ({paged_out} rounds paged \
         out, {} slots used)",
        bases.len()
    );
}
