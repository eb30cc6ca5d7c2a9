//! A bounded soak: a mixed storm against one `modrun serve` for a fixed
//! time (`MODRUN_SOAK_SECS`, 60 by default; longer on demand), then checks
//! that the server's resident memory, open files and threads came back to
//! what they were once warm, and that every run it took ended.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::server::Server;
use crate::support::{DEADLINE, built_plugins, plugins_dir};

/// What the server holds: resident KiB, open files, threads.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    rss_kib: u64,
    files: usize,
    threads: u64,
}

fn footprint(pid: u32) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    Footprint {
        rss_kib: field("VmRSS:"),
        files: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count(),
        threads: field("Threads:"),
    }
}

/// What the server's open file descriptors point at.
fn open_files(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .map(|target| target.display().to_string())
        .collect()
}

/// A small deterministic random sequence per storm thread.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }
}

/// What the storm did, counted, and how it is told to rest or stop.
#[derive(Default)]
struct Tally {
    started: Mutex<Vec<String>>,
    refused: AtomicU64,
    cancels: AtomicU64,
    /// While set, storm threads rest between requests.
    pause: AtomicBool,
    /// How many storm threads are resting.
    resting: AtomicUsize,
    stop: AtomicBool,
}

/// How many threads storm the server.
const STORMS: usize = 2;

fn storm(base: &str, seed: u64, tally: &Tally) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let start = |module: &str, parameters: Value| -> Option<String> {
        let mut response = agent
            .post(&format!("{base}/modules/{module}/runs"))
            .send_json(&parameters)
            .expect("the server answers");
        let status = response.status().as_u16();
        let body: Value = response.body_mut().read_json().unwrap_or_default();
        match status {
            202 => {
                let run_id = body["run_id"].as_str().unwrap().to_owned();
                tally.started.lock().unwrap().push(run_id.clone());
                Some(run_id)
            }
            429 => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
            other => panic!("start of {module} answered {other}: {body}"),
        }
    };
    let mut dice = Dice(seed);
    let mut to_cancel: Option<String> = None;
    while !tally.stop.load(Ordering::Relaxed) {
        if tally.pause.load(Ordering::Acquire) {
            tally.resting.fetch_add(1, Ordering::AcqRel);
            while tally.pause.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
            }
            tally.resting.fetch_sub(1, Ordering::AcqRel);
        }
        match dice.roll(20) {
            0..=9 => {
                start("hello", json!({"name": "storm"}));
            }
            10 => {
                start("countdown", json!({"seconds": 1, "step_ms": 50}));
            }
            11 | 12 => {
                if let Some(run_id) = to_cancel.take() {
                    let response = agent
                        .delete(&format!("{base}/runs/{run_id}"))
                        .call()
                        .expect("the server answers");
                    assert!([200, 409].contains(&response.status().as_u16()));
                    tally.cancels.fetch_add(1, Ordering::Relaxed);
                }
                to_cancel = start("countdown", json!({"seconds": 5, "step_ms": 20}));
            }
            13 => {
                start("spin", json!({}));
            }
            14 => {
                start("membomb", json!({}));
            }
            15 => {
                start("abuse", json!({"mode": "progress", "count": 200_000}));
            }
            16 => {
                start("abuse", json!({"mode": "log", "count": 20_000}));
            }
            17 => {
                start("abuse", json!({"mode": "output", "bytes": 2 << 20}));
            }
            _ => {
                let response = agent
                    .get(&format!("{base}/runs?limit=200"))
                    .call()
                    .expect("the server answers");
                assert_eq!(response.status().as_u16(), 200);
            }
        }
    }
}

/// Every run the server recorded, by id, with its status.
fn recorded(server: &Server) -> Vec<(String, String)> {
    let mut runs = Vec::new();
    let mut uri = "/runs?limit=10000".to_owned();
    loop {
        let (status, page) = server.get(&uri);
        assert_eq!(status, 200, "{page}");
        for run in page["runs"].as_array().unwrap() {
            runs.push((
                run["run_id"].as_str().unwrap().to_owned(),
                run["status"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/runs?limit=10000&cursor={cursor}"),
            None => return runs,
        }
    }
}

/// Waits until the server has no queued or running run.
fn wait_idle(server: &Server) {
    let since = Instant::now();
    loop {
        let (_, active) = server.get("/runs?status=queued,running&limit=1");
        if active["runs"].as_array().unwrap().is_empty() {
            return;
        }
        assert!(
            since.elapsed() < DEADLINE * 3,
            "runs still active: {active}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_storm_of_starts_cancels_reloads_and_hostile_plugins_leaves_the_server_flat() {
    let seconds: u64 = std::env::var("MODRUN_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let plugins = plugins_dir(&["hello", "countdown", "spin", "membomb", "abuse"]);
    std::fs::write(
        plugins.path().join("spin.toml"),
        "[limits]\ntimeout_secs = 1\n",
    )
    .unwrap();
    std::fs::write(
        plugins.path().join("membomb.toml"),
        "[limits]\nmemory_mib = 16\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        plugins.path(),
        &data.path().join("registry.db"),
        &[
            "--max-concurrent",
            "16",
            "--max-queued",
            "256",
            "--grace",
            "1",
        ],
    );
    let pid = server.child.id();

    let tally = Arc::new(Tally::default());
    let storms: Vec<_> = (1..=STORMS as u64)
        .map(|seed| {
            let (base, tally) = (server.base.clone(), tally.clone());
            std::thread::spawn(move || {
                storm(&base, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), &tally)
            })
        })
        .collect();

    // Reloads: the countdown module switches version every second.
    let versions = [
        built_plugins().join("countdown.wasm"),
        built_plugins().join("countdown_v2.wasm"),
    ];
    let began = Instant::now();
    let warm_at = Duration::from_secs(seconds / 4);
    let mut warm: Option<Footprint> = None;
    let mut peak = footprint(pid);
    let mut reloads = 0usize;
    while began.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        let staged = plugins.path().join("countdown.wasm.partial");
        std::fs::copy(&versions[reloads % 2], &staged).unwrap();
        std::fs::rename(&staged, plugins.path().join("countdown.wasm")).unwrap();
        reloads += 1;
        let now = footprint(pid);
        peak.rss_kib = peak.rss_kib.max(now.rss_kib);
        peak.files = peak.files.max(now.files);
        peak.threads = peak.threads.max(now.threads);
        if warm.is_none() && began.elapsed() >= warm_at {
            // The warm footprint is taken at rest, like the final one.
            tally.pause.store(true, Ordering::Release);
            let since = Instant::now();
            while tally.resting.load(Ordering::Acquire) < STORMS {
                assert!(since.elapsed() < DEADLINE, "the storm did not pause");
                std::thread::sleep(Duration::from_millis(10));
            }
            wait_idle(&server);
            warm = Some(footprint(pid));
            tally.pause.store(false, Ordering::Release);
        }
    }
    tally.stop.store(true, Ordering::Relaxed);
    for storm in storms {
        storm.join().expect("a storm thread failed");
    }
    wait_idle(&server);
    let end = footprint(pid);
    let warm = warm.expect("a warm footprint was taken");

    let started: HashSet<String> = tally.started.lock().unwrap().iter().cloned().collect();
    let runs = recorded(&server);
    let terminal: HashSet<&String> = runs
        .iter()
        .filter(|(_, status)| ["completed", "failed", "cancelled"].contains(&status.as_str()))
        .map(|(run_id, _)| run_id)
        .collect();
    println!(
        "soak {seconds}s: {} runs started, {} refused (429), {} cancels, {reloads} reloads; \
         resident {} -> {} KiB (peak {}), files {} -> {} (peak {}), threads {} -> {} (peak {})",
        started.len(),
        tally.refused.load(Ordering::Relaxed),
        tally.cancels.load(Ordering::Relaxed),
        warm.rss_kib,
        end.rss_kib,
        peak.rss_kib,
        warm.files,
        end.files,
        peak.files,
        warm.threads,
        end.threads,
        peak.threads,
    );
    assert!(
        started.len() > 100,
        "the storm started only {} runs",
        started.len()
    );
    let unfinished: Vec<_> = started.iter().filter(|id| !terminal.contains(id)).collect();
    assert!(unfinished.is_empty(), "runs not ended: {unfinished:?}");
    assert!(
        end.rss_kib < warm.rss_kib + 64 * 1024,
        "resident memory grew from {} to {} KiB",
        warm.rss_kib,
        end.rss_kib
    );
    // The registry's pool of read connections (up to 4, a few files each)
    // may still be filling when the warm footprint is taken; and each free
    // instance slot kept warm (at most `WARM_SLOTS`) may hold the memory
    // image of a version a reload has since replaced.
    assert!(
        end.files <= warm.files + 16 + modrun::module::WARM_SLOTS as usize,
        "open files grew from {} to {}: {:?}",
        warm.files,
        end.files,
        open_files(pid)
    );
    assert!(
        end.threads <= warm.threads + 16,
        "threads grew from {} to {}",
        warm.threads,
        end.threads
    );
    assert_eq!(server.terminate(), 0);
}
