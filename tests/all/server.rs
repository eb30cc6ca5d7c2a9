use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use modrun::{RunRegistry, RunStatus};
use serde_json::{Value, json};

use crate::support::{DEADLINE, plugins_dir};

/// A `modrun serve` process on an ephemeral loopback port.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) base: String,
}

impl Server {
    pub(crate) fn start(plugins: &Path, db: &Path, extra: &[&str]) -> Server {
        Server::start_logging_to(plugins, db, extra, Stdio::null())
    }

    /// [`start`](Self::start), with the server's log going to `stderr`.
    pub(crate) fn start_logging_to(
        plugins: &Path,
        db: &Path,
        extra: &[&str],
        stderr: Stdio,
    ) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_modrun"))
            .args(["serve", "--bind", "127.0.0.1:0", "--plugins"])
            .arg(plugins)
            .arg("--db")
            .arg(db)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("modrun serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        Server {
            child,
            base: address,
        }
    }

    pub(crate) fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = ureq::post(&format!("{}{path}", self.base))
            .config()
            .http_status_as_error(false)
            .build()
            .send_json(body)
            .expect("request sent");
        read(response)
    }

    pub(crate) fn delete(&self, path: &str) -> (u16, Value) {
        call(ureq::delete(&format!("{}{path}", self.base)))
    }

    pub(crate) fn get(&self, path: &str) -> (u16, Value) {
        call(ureq::get(&format!("{}{path}", self.base)))
    }

    pub(crate) fn start_run(&self, module: &str, parameters: Value) -> String {
        let (status, body) = self.post(&format!("/modules/{module}/runs"), &parameters);
        assert_eq!(status, 202, "{body}");
        body["run_id"].as_str().unwrap().to_owned()
    }

    pub(crate) fn wait_status(&self, run_id: &str, wanted: &str) {
        self.wait_status_within(run_id, wanted, DEADLINE);
    }

    /// [`wait_status`](Self::wait_status) for a run that takes long.
    pub(crate) fn wait_status_within(&self, run_id: &str, wanted: &str, deadline: Duration) {
        let start = Instant::now();
        loop {
            let (_, body) = self.get(&format!("/runs/{run_id}"));
            if body["run"]["status"] == wanted {
                return;
            }
            assert!(
                start.elapsed() < deadline,
                "{run_id} never became {wanted}: {body}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One figure of the server's `/metrics`, if it shows it.
    pub(crate) fn metric(&self, name: &str) -> Option<f64> {
        let text = ureq::get(&format!("{}/metrics", self.base))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.trim().parse().ok())
    }

    /// Sends SIGTERM and waits for the exit code.
    pub(crate) fn terminate(mut self) -> i32 {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a request without a body; any status is an answer.
fn call(request: ureq::RequestBuilder<ureq::typestate::WithoutBody>) -> (u16, Value) {
    let response = request
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .expect("request sent");
    read(response)
}

fn read(mut response: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.body_mut().read_json().unwrap_or(Value::Null);
    (status, body)
}

async fn stored(db: &Path) -> RunRegistry {
    RunRegistry::open_sqlite(db).expect("the registry opens after the server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_quick_runs_cancels_the_rest_and_exits_zero() {
    let plugins = plugins_dir(&["hello", "countdown"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let server = Server::start(plugins.path(), &db, &["--grace", "0.5"]);
    let quick = server.start_run("hello", json!({"name": "Ada"}));
    server.wait_status(&quick, "completed");
    let slow: Vec<String> = (0..3)
        .map(|_| server.start_run("countdown", json!({"seconds": 60, "step_ms": 50})))
        .collect();
    for run_id in &slow {
        server.wait_status(run_id, "running");
    }
    assert_eq!(server.terminate(), 0);

    let registry = stored(&db).await;
    assert_eq!(
        registry.get_run(&quick).await.unwrap().unwrap().status,
        RunStatus::Completed
    );
    for run_id in &slow {
        let run = registry.get_run(run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Cancelled, "{run_id}");
        assert_eq!(run.error_message.as_deref(), Some("cancelled: shutdown"));
    }
    assert!(registry.active_runs().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_a_restart_keeps_every_run_and_marks_the_unfinished_interrupted() {
    let plugins = plugins_dir(&["hello", "countdown"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let mut server = Server::start(plugins.path(), &db, &[]);
    let done = server.start_run("hello", json!({"name": "kept"}));
    server.wait_status(&done, "completed");
    let running: Vec<String> = (0..3)
        .map(|_| server.start_run("countdown", json!({"seconds": 60, "step_ms": 50})))
        .collect();
    for run_id in &running {
        server.wait_status(run_id, "running");
    }
    server.child.kill().unwrap(); // SIGKILL: no chance to clean up
    server.child.wait().unwrap();
    drop(server);

    let restarted = Server::start(plugins.path(), &db, &[]);
    let (_, body) = restarted.get(&format!("/runs/{done}"));
    assert_eq!(body["run"]["status"], "completed");
    assert_eq!(body["run"]["output"], json!({"greeting": "Hello, kept!"}));
    for run_id in &running {
        let (status, body) = restarted.get(&format!("/runs/{run_id}"));
        assert_eq!(status, 200, "handed-out run {run_id} lost: {body}");
        assert_eq!(body["run"]["status"], "failed");
        assert!(
            body["run"]["error_message"]
                .as_str()
                .unwrap()
                .starts_with("interrupted")
        );
        let statuses: Vec<&str> = body["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["status"].as_str().unwrap())
            .collect();
        assert_eq!(statuses, ["queued", "running", "failed"]);
    }
    assert_eq!(restarted.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_runs_still_queued_are_resumed() {
    let plugins = plugins_dir(&["hello", "countdown"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let one_at_a_time = ["--max-concurrent", "1"];
    let mut server = Server::start(plugins.path(), &db, &one_at_a_time);
    let running = server.start_run("countdown", json!({"seconds": 60, "step_ms": 50}));
    server.wait_status(&running, "running");
    let waiting: Vec<String> = ["one", "two"]
        .iter()
        .map(|name| server.start_run("hello", json!({"name": name})))
        .collect();
    let orphan = server.start_run("countdown", json!({"seconds": 0.1, "step_ms": 10}));
    for run_id in waiting.iter().chain([&orphan]) {
        let (_, body) = server.get(&format!("/runs/{run_id}"));
        assert_eq!(body["run"]["status"], "queued", "{body}");
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    drop(server);
    // The countdown module goes away meanwhile: its queued run cannot resume.
    std::fs::remove_file(plugins.path().join("countdown.wasm")).unwrap();

    let restarted = Server::start(plugins.path(), &db, &one_at_a_time);
    for (run_id, name) in waiting.iter().zip(["one", "two"]) {
        restarted.wait_status(run_id, "completed");
        let (_, body) = restarted.get(&format!("/runs/{run_id}"));
        assert_eq!(
            body["run"]["output"],
            json!({"greeting": format!("Hello, {name}!")})
        );
        let statuses: Vec<&str> = body["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["status"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses,
            ["queued", "running", "completed"],
            "one history, resumed"
        );
    }
    let (_, body) = restarted.get(&format!("/runs/{running}"));
    assert_eq!(body["run"]["status"], "failed");
    assert!(
        body["run"]["error_message"]
            .as_str()
            .unwrap()
            .starts_with("interrupted")
    );
    let (_, body) = restarted.get(&format!("/runs/{orphan}"));
    assert_eq!(body["run"]["status"], "failed");
    let message = body["run"]["error_message"].as_str().unwrap();
    assert!(message.contains("not loaded any more"), "{message}");
    assert_eq!(restarted.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_starts_past_the_limits_gets_429s_and_loses_nothing() {
    let plugins = plugins_dir(&["countdown"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let server = Server::start(
        plugins.path(),
        &db,
        &[
            "--max-concurrent",
            "4",
            "--max-queued",
            "100",
            "--grace",
            "30",
        ],
    );
    let base = server.base.clone();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let base = base.clone();
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                for _ in 0..100 {
                    let response = ureq::post(&format!("{base}/modules/countdown/runs"))
                        .config()
                        .http_status_as_error(false)
                        .build()
                        .send_json(json!({"seconds": 0.02, "step_ms": 10}))
                        .expect("request sent");
                    outcomes.push(read(response));
                }
                outcomes
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for client in clients {
        for (status, body) in client.join().unwrap() {
            match status {
                202 => accepted.push(body["run_id"].as_str().unwrap().to_owned()),
                429 => {
                    assert_eq!(body["error"]["code"], "queue_full");
                    refused += 1;
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
    }
    assert_eq!(accepted.len() + refused, 2000);
    assert!(refused > 0, "the limits were never reached");
    let start = Instant::now();
    loop {
        let (_, body) = server.get("/runs/active");
        if body["count"] == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "runs never drained: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.terminate(), 0);
    let registry = stored(&db).await;
    for run_id in &accepted {
        let run = registry
            .get_run(run_id)
            .await
            .unwrap()
            .expect("accepted run kept");
        assert_eq!(
            run.status,
            RunStatus::Completed,
            "{run_id}: {:?}",
            run.error_message
        );
    }
    assert_eq!(
        registry.recent_runs(5000).await.unwrap().len(),
        accepted.len()
    );
}

#[test]
fn a_non_loopback_bind_without_a_token_is_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_modrun"))
        .args(["serve", "--bind", "0.0.0.0:0", "--in-memory"])
        .env_remove("MODRUN_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("without a token"), "{stderr}");
}

/// `modrun ARGS --plugins PLUGINS --db DB`, run to its end.
pub(crate) fn modrun_on(plugins: &Path, db: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_modrun"))
        .args(args)
        .arg("--plugins")
        .arg(plugins)
        .arg("--db")
        .arg(db)
        .output()
        .unwrap()
}

#[test]
fn modrun_run_reports_through_its_exit_code() {
    let plugins = plugins_dir(&["hello", "spin", "panic", "trap"]);
    std::fs::write(
        plugins.path().join("spin.toml"),
        "[limits]\ntimeout_secs = 0.3\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let run = |args: &[&str]| modrun_on(plugins.path(), &db, &[&["run"], args].concat());
    let ok = run(&["hello", "name=Ada", "times=2"]);
    assert_eq!(ok.status.code(), Some(0));
    let output: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(output, json!({"greeting": "Hello, Ada! Hello, Ada!"}));
    assert!(String::from_utf8_lossy(&ok.stderr).contains("[info] greeting Ada"));

    let with_json = run(&["hello", "--params", r#"{"name": "Bo"}"#]);
    assert_eq!(with_json.status.code(), Some(0));
    for (args, code, words) in [
        (&["hello", "name=5"][..], 2, "is not of type"),
        (&["hello", "oops"][..], 2, "not key=value"),
        (&["nope"][..], 2, "no module \"nope\""),
        (&["spin"][..], 124, "timed out after 0.3s"),
        (&["panic"][..], 101, "panicked"),
        (&["trap"][..], 1, "unreachable"),
    ] {
        let result = run(args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
    }
}

/// The compiled components in a cache directory.
fn cached(cache: &Path) -> usize {
    std::fs::read_dir(cache).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|ext| ext == "cwasm"))
            .count()
    })
}

#[test]
fn every_command_shares_one_compiled_cache_and_run_compiles_only_its_module() {
    let plugins = plugins_dir(&["hello", "countdown", "spin"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let cache = data.path().join("cache");
    let modrun = |args: &[&str]| modrun_on(plugins.path(), &db, args);
    let run = modrun(&["run", "hello", "name=Ada"]);
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    assert_eq!(cached(&cache), 1, "only the module run was compiled");
    let listed = modrun(&["modules"]);
    let listing = String::from_utf8_lossy(&listed.stdout);
    for id in ["hello", "countdown", "spin"] {
        assert!(listing.contains(id), "{listing}");
    }
    assert_eq!(cached(&cache), 3);
    // A server on the same registry finds them compiled.
    let server = Server::start(plugins.path(), &db, &[]);
    assert_eq!(server.metric("modrun_modules_compiled_total"), Some(0.0));
    drop(server);
    let again = modrun(&["run", "countdown", "seconds=0"]);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert_eq!(cached(&cache), 3);
}

#[test]
fn modrun_run_passes_a_priority_and_a_start_time_here_and_through_a_server() {
    let plugins = plugins_dir(&["hello"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let modrun = |args: &[&str]| modrun_on(plugins.path(), &db, args);
    for args in [
        &["run", "hello", "--delay", "soon"][..],
        &["run", "hello", "--not-before", "tomorrow"][..],
        &["run", "hello", "--priority", "99999"][..],
        &[
            "run",
            "hello",
            "--delay",
            "1s",
            "--not-before",
            "2030-01-01T00:00:00Z",
        ][..],
    ] {
        let refused = modrun(args);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{args:?}: {stderr}");
    }

    // Here: the run is recorded with its priority.
    let here = modrun(&["run", "hello", "name=Ada", "--priority", "-3"]);
    assert_eq!(here.status.code(), Some(0), "{here:?}");

    // Through the server that holds the registry: it waits its time.
    let server = Server::start(plugins.path(), &db, &[]);
    let asked = chrono::Utc::now() + chrono::TimeDelta::seconds(1);
    let through = modrun(&[
        "run",
        "hello",
        "name=Bo",
        "--priority",
        "6",
        "--delay",
        "1s",
    ]);
    assert_eq!(through.status.code(), Some(0), "{through:?}");
    let (_, listing) = server.get("/runs?module=hello");
    let runs = listing["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{listing}");
    let run_of = |index: usize| {
        let run_id = runs[index]["run_id"].as_str().unwrap();
        server.get(&format!("/runs/{run_id}")).1["run"].clone()
    };
    let (later, first) = (run_of(0), run_of(1));
    assert_eq!(first["priority"], -3, "{first}");
    assert_eq!(later["priority"], 6, "{later}");
    let not_before: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(later["not_before"].clone()).unwrap();
    let started: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(later["started_at"].clone()).unwrap();
    assert!(not_before >= asked, "{later}");
    assert!(started >= not_before, "{later}");
}

#[test]
fn a_plugin_source_not_built_yet_is_named_with_the_command_that_builds_it() {
    let plugins = plugins_dir(&["countdown"]);
    let source = plugins.path().join("greeter");
    std::fs::create_dir_all(source.join("src")).unwrap();
    std::fs::write(
        source.join("Cargo.toml"),
        "[package]\nname = \"greeter\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();
    std::fs::write(source.join("src/lib.rs"), "").unwrap();
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let modrun = |args: &[&str]| modrun_on(plugins.path(), &db, args);
    let listed = modrun(&["modules"]);
    let listing = String::from_utf8_lossy(&listed.stdout);
    assert!(listing.contains("countdown"), "{listing}");
    assert!(
        listing.contains("not built:")
            && listing.contains("greeter")
            && listing.contains("modrun build"),
        "{listing}"
    );
    let refused = modrun(&["run", "greeter", "--no-build"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is not built yet") && stderr.contains("modrun build"),
        "{stderr}"
    );
    let empty = tempfile::tempdir().unwrap();
    let none = modrun_on(empty.path(), &db, &["modules"]);
    assert!(
        String::from_utf8_lossy(&none.stdout).contains("holds no modules"),
        "{none:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_followed_through_the_event_stream_and_cancelled_by_the_cli() {
    let plugins = plugins_dir(&["hello", "countdown"]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(plugins.path(), &data.path().join("registry.db"), &[]);

    // Follow a countdown through /events until it completes.
    let run_id = server.start_run("countdown", json!({"seconds": 0.3, "step_ms": 50}));
    let response = ureq::get(&format!("{}/events?run_id={run_id}", server.base))
        .call()
        .unwrap();
    let mut seen = Vec::new();
    let lines = BufReader::new(response.into_body().into_reader()).lines();
    for line in lines {
        let line = line.unwrap();
        if let Some(event) = line.strip_prefix("event: ") {
            seen.push(event.to_owned());
        }
        if line.starts_with("data: ") && line.contains("\"status\":\"completed\"") {
            break;
        }
    }
    assert_eq!(
        seen.first().map(String::as_str),
        Some("snapshot"),
        "{seen:?}"
    );
    assert!(seen.iter().any(|e| e == "progress"), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("status"), "{seen:?}");

    // Cancel one mid-countdown with `modrun cancel`.
    let long = server.start_run("countdown", json!({"seconds": 60, "step_ms": 50}));
    server.wait_status(&long, "running");
    let cancel = |run_id: &str| {
        Command::new(env!("CARGO_BIN_EXE_modrun"))
            .args(["cancel", run_id, "--server", &server.base])
            .output()
            .unwrap()
    };
    let first = cancel(&long);
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    server.wait_status(&long, "cancelled");
    let again = cancel(&long);
    assert_eq!(again.status.code(), Some(1), "already finished");
    let unknown = cancel("no-such-run");
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"));
}

#[test]
fn ctrl_c_cancels_a_modrun_run_and_exits_130() {
    let plugins = plugins_dir(&["countdown"]);
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_modrun"))
        .args(["run", "countdown", "seconds=60", "step_ms=50", "--plugins"])
        .arg(plugins.path())
        .arg("--db")
        .arg(data.path().join("registry.db"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it reports progress: the run is under way.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains('%') {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "modrun run ended early"
        );
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < DEADLINE, "modrun run ignored Ctrl-C");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(130));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(rest.contains("cancelled by user"), "{rest}");
}

#[test]
fn runs_and_show_read_the_registry_while_a_server_holds_it() {
    let plugins = plugins_dir(&["hello", "countdown"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let server = Server::start(plugins.path(), &db, &["--grace", "0.2"]);
    let done = server.start_run("hello", json!({"name": "Ada"}));
    server.wait_status(&done, "completed");
    let running = server.start_run("countdown", json!({"seconds": 60, "step_ms": 50}));
    server.wait_status(&running, "running");

    let modrun = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_modrun"))
            .args(args)
            .arg("--db")
            .arg(&db)
            .arg("--json")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let runs = modrun(&["runs"]);
    let listed: Vec<(&str, &str)> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|run| {
            (
                run["run_id"].as_str().unwrap(),
                run["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [(running.as_str(), "running"), (done.as_str(), "completed")]
    );
    let active = modrun(&["runs", "--status", "running"]);
    assert_eq!(active.as_array().unwrap().len(), 1, "{active}");

    let shown = modrun(&["show", &done]);
    assert_eq!(shown["run"]["output"]["greeting"], "Hello, Ada!");
    let statuses: Vec<&str> = shown["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|change| change["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["queued", "running", "completed"]);

    // Reading changed nothing: the server still owns the run, and ends it.
    assert_eq!(server.terminate(), 0);
    let after = modrun(&["show", &running]);
    assert_eq!(after["run"]["status"], "cancelled", "{after}");
}

/// The wake-ups so far of the epoch ticker of process `pid`.
#[cfg(target_os = "linux")]
fn ticker_wakeups(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let ticker = tasks
        .filter_map(Result::ok)
        .find(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim() == "modrun-epoch")
        })
        .expect("the server has an epoch ticker");
    let status = std::fs::read_to_string(ticker.path().join("status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("the ticker's wake-ups")
}

/// Waits until a quarter of a second (250 ticks of the default 1 ms)
/// passes without a wake-up of the server's epoch ticker.
#[cfg(target_os = "linux")]
fn wait_for_quiet_ticker(server: &Server) {
    let start = Instant::now();
    loop {
        let before = ticker_wakeups(server.child.id());
        std::thread::sleep(Duration::from_millis(250));
        if ticker_wakeups(server.child.id()) == before {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the epoch ticker of an idle server kept waking up"
        );
    }
}

/// An idle server takes no wake-ups: its epoch ticker (which lets every
/// running module yield, time out and be cancelled) sleeps while no
/// module runs, and wakes for the next run, which still times out.
#[cfg(target_os = "linux")]
#[test]
fn an_idle_server_stops_ticking_and_a_spinning_run_still_times_out() {
    let plugins = plugins_dir(&["hello", "spin"]);
    std::fs::write(
        plugins.path().join("spin.toml"),
        "[limits]\ntimeout_secs = 0.5\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(plugins.path(), &data.path().join("registry.db"), &[]);
    wait_for_quiet_ticker(&server);

    let before = ticker_wakeups(server.child.id());
    let spin = server.start_run("spin", json!({}));
    server.wait_status(&spin, "failed");
    let (_, body) = server.get(&format!("/runs/{spin}"));
    let message = body["run"]["error_message"].as_str().unwrap_or_default();
    assert!(message.contains("timed out after 0.5s"), "{body}");
    let woken = ticker_wakeups(server.child.id()) - before;
    assert!(woken >= 50, "the ticker woke {woken} times while spin ran");

    let hello = server.start_run("hello", json!({"name": "Ada"}));
    server.wait_status(&hello, "completed");
    wait_for_quiet_ticker(&server);
}
