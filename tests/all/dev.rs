use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::built_plugins;

/// How long a plugin build may take here (the suite's other tests share
/// the two cores).
const BUILD_DEADLINE: Duration = Duration::from_secs(240);

/// A `modrun dev` process and the lines it printed.
struct Dev {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Dev {
    /// Waits for a line that `wanted` accepts, and returns it.
    fn wait_line(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + BUILD_DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "modrun dev never printed {what}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the bundled plugin sources (not their build output).
fn copy_sources(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let path = entry.path();
        if name == "target" || path.extension().is_some_and(|ext| ext == "wasm") {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(to.join(&name)).unwrap();
            copy_sources(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}

fn get(base: &str, path: &str) -> Value {
    ureq::get(format!("{base}{path}"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap()
}

#[test]
fn dev_serves_rebuilds_reruns_and_keeps_the_last_good_version() {
    // The suite's plugin build warms the target directory this one shares.
    let target = built_plugins().parent().unwrap().join("plugins-target");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The plugin crates find the contract at ../../wit.
    let copy = tempfile::tempdir().unwrap();
    let plugins = copy.path().join("plugins");
    for dir in ["plugins", "wit"] {
        std::fs::create_dir_all(copy.path().join(dir)).unwrap();
        copy_sources(&root.join(dir), &copy.path().join(dir));
    }
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_modrun"))
        .args(["dev", "--bind", "127.0.0.1:0", "--plugins"])
        .arg(&plugins)
        .arg("--db")
        .arg(data.path().join("registry.db"))
        .arg("--target-dir")
        .arg(&target)
        .args(["--run", "hello", "name=Ada"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (sender, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let mut dev = Dev {
        child,
        lines,
        seen: Vec::new(),
    };
    let serving = dev.wait_line("where it serves", |line| line.starts_with("serving "));
    let base = serving.rsplit_once(" on ").unwrap().1.to_owned();
    assert!(serving.contains("hello"), "{serving}");
    dev.wait_line("the first run's output", |line| {
        line.contains("Hello, Ada!")
    });

    // An edit: rebuilt, reloaded, run again, with the new output.
    let source = plugins.join("hello/src/lib.rs");
    let original = std::fs::read_to_string(&source).unwrap();
    let edited = original.replace("\"Hello, {name}!\"", "\"Howdy, {name}!\"");
    assert_ne!(edited, original);
    std::fs::write(&source, &edited).unwrap();
    dev.wait_line("the edited run's output", |line| {
        line.contains("Howdy, Ada!")
    });
    let runs = get(&base, "/runs?module=hello");
    let versions: Vec<&str> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["module_version"].as_str().unwrap())
        .collect();
    assert_eq!(versions.len(), 2, "{runs}");
    assert_ne!(
        versions[0], versions[1],
        "the new run records the new version"
    );

    // A broken save: the error, once, with its place; the old version serves.
    std::fs::write(&source, format!("{edited}\nfn broken( {{\n")).unwrap();
    let error = dev.wait_line("the compiler's error", |line| line.starts_with("error: "));
    assert!(error.contains("hello/src/lib.rs:"), "{error}");
    let started: Value = ureq::post(format!("{base}/modules/hello/runs"))
        .send_json(json!({"name": "Bo"}))
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let run_id = started["run_id"].as_str().unwrap();
    let until = Instant::now() + BUILD_DEADLINE;
    let finished = loop {
        let run = get(&base, &format!("/runs/{run_id}"));
        if run["run"]["status"] == "completed" {
            break run;
        }
        assert!(Instant::now() < until, "{run}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(finished["run"]["output"], json!({"greeting": "Howdy, Bo!"}));

    // The fix clears the error.
    std::fs::write(&source, &edited).unwrap();
    dev.wait_line("that the build is fixed", |line| line == "build fixed");

    // A manifest change reloads the module, no build needed.
    std::fs::write(plugins.join("hello.toml"), "[limits]\ntimeout_secs = 7\n").unwrap();
    let reloaded = dev.wait_line("the manifest reload", |line| {
        line.starts_with("reloaded hello")
    });
    let module = get(&base, "/modules/hello");
    assert_eq!(
        module["manifest"]["limits"]["timeout"]["secs"], 7,
        "{reloaded}: {module}"
    );
    let pid = dev.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = dev.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(Instant::now() < until, "modrun dev did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
