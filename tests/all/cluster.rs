use std::path::Path;
use std::time::{Duration, Instant};

use modrun::registry::{PostgresOptions, PostgresStore};
use modrun::{Run, RunRegistry, RunStatus, Transition};
use serde_json::json;

use crate::server::Server;
use crate::support::{DEADLINE, database_url, fresh_database, fresh_schema, plugins_dir};

/// Two stores on one schema, as two nodes see it.
async fn node(url: &str, schema: &str, name: &str, lease: Duration) -> RunRegistry {
    let options = PostgresOptions {
        schema: schema.to_owned(),
        node: name.to_owned(),
        lease,
        ..PostgresOptions::default()
    };
    RunRegistry::new(PostgresStore::connect(url, options).await.unwrap())
}

async fn wait_for(registry: &RunRegistry, run_id: &str, status: RunStatus) -> Run {
    let start = Instant::now();
    loop {
        let run = registry.get_run(run_id).await.unwrap().unwrap();
        if run.status == status {
            return run;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{run_id} is still {} (wanted {status})",
            run.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nodes_active_runs_fail_and_its_finished_runs_stay() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    // The lost node's lease is short, the survivor's long: however loaded
    // the machine, only the node the test loses is lost.
    let lost = node(&url, &schema, "lost", Duration::from_secs(2)).await;
    let survivor = node(&url, &schema, "survivor", Duration::from_secs(30)).await;

    let finished = Run::new("hello", "Hello");
    lost.add_run(&finished).await.unwrap();
    assert!(
        lost.transition(&Transition::running(&finished.run_id))
            .await
            .unwrap()
    );
    assert!(
        lost.transition(&Transition::completed(&finished.run_id, json!("done")))
            .await
            .unwrap()
    );
    let running = Run::new("countdown", "Countdown");
    lost.add_run(&running).await.unwrap();
    assert!(
        lost.transition(&Transition::running(&running.run_id))
            .await
            .unwrap()
    );
    let queued = Run::new("countdown", "Countdown");
    lost.add_run(&queued).await.unwrap();
    let mine = Run::new("hello", "Hello");
    survivor.add_run(&mine).await.unwrap();

    // The lost node stops renewing its lease (its store is closed); within
    // a lease and a heartbeat the survivor settles its active runs, and
    // its subscribers hear of it.
    let mut heard = survivor.subscribe();
    drop(lost);
    let mut settled = std::collections::HashSet::new();
    while settled.len() < 2 {
        let event = tokio::time::timeout(DEADLINE, heard.recv())
            .await
            .expect("the settled runs are announced")
            .unwrap();
        if let modrun::RunEvent::Status { run_id, change, .. } = event
            && change.status == RunStatus::Failed
        {
            settled.insert(run_id);
        }
    }
    assert_eq!(
        settled,
        [running.run_id.clone(), queued.run_id.clone()].into()
    );
    for run_id in [&running.run_id, &queued.run_id] {
        let run = wait_for(&survivor, run_id, RunStatus::Failed).await;
        let message = run.error_message.unwrap();
        assert!(
            message.starts_with("node lost: lost stopped renewing"),
            "{message}"
        );
        let history = survivor.history(run_id).await.unwrap();
        assert_eq!(history.last().unwrap().status, RunStatus::Failed);
    }
    let finished = survivor.get_run(&finished.run_id).await.unwrap().unwrap();
    assert_eq!(
        finished.status,
        RunStatus::Completed,
        "a finished run keeps its end"
    );
    let mine = survivor.get_run(&mine.run_id).await.unwrap().unwrap();
    assert_eq!(
        mine.status,
        RunStatus::Queued,
        "a live node's runs are left alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_marks_what_its_last_process_left_interrupted() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let first = node(&url, &schema, "worker-1", Duration::from_secs(30)).await;
    let run = Run::new("countdown", "Countdown");
    first.add_run(&run).await.unwrap();
    assert!(
        first
            .transition(&Transition::running(&run.run_id))
            .await
            .unwrap()
    );
    drop(first);
    // The same node name again, long before its old lease ran out.
    let second = node(&url, &schema, "worker-1", Duration::from_secs(30)).await;
    let run = second.get_run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        run.error_message.as_deref(),
        Some(modrun::registry::INTERRUPTED)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_hears_the_others_status_changes_and_progress_in_order() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let lease = Duration::from_secs(30);
    let a = node(&url, &schema, "a", lease).await;
    let b = node(&url, &schema, "b", lease).await;
    let mut heard = a.subscribe();

    let own = Run::new("hello", "Hello");
    a.add_run(&own).await.unwrap();
    let theirs = Run::new("hello", "Hello");
    b.add_run(&theirs).await.unwrap();
    assert!(
        b.transition(&Transition::running(&theirs.run_id))
            .await
            .unwrap()
    );
    let half = modrun::Progress {
        fraction: 0.5,
        message: "half way".into(),
    };
    b.report_progress(&theirs.run_id, "hello", half.clone())
        .unwrap();
    let line = modrun::LogEntry {
        at: chrono::Utc::now(),
        level: modrun::LogLevel::Info,
        source: modrun::LogSource::Log,
        message: "a line on b".into(),
    };
    b.publish_log(&theirs.run_id, "hello", &line);
    assert!(
        b.transition(&Transition::completed(&theirs.run_id, json!("done")))
            .await
            .unwrap()
    );

    let mut own_events = 0;
    let mut their_statuses = Vec::new();
    let mut their_progress = Vec::new();
    let mut their_log = Vec::new();
    // B's status changes and progress, in the order a heard them.
    let mut their_order = Vec::new();
    while their_statuses.len() < 3 || their_log.is_empty() {
        let event = tokio::time::timeout(DEADLINE, heard.recv())
            .await
            .expect("b's status changes reach a")
            .unwrap();
        let (run_id, change) = match event {
            modrun::RunEvent::Status { run_id, change, .. } => (run_id, change),
            modrun::RunEvent::Progress {
                run_id, progress, ..
            } if run_id == theirs.run_id => {
                their_order.push(format!("progress {}", progress.fraction));
                their_progress.push(progress);
                continue;
            }
            modrun::RunEvent::Log { run_id, entry, .. } if run_id == theirs.run_id => {
                their_log.push(entry);
                continue;
            }
            _ => continue,
        };
        if run_id == own.run_id {
            own_events += 1;
        } else if run_id == theirs.run_id {
            their_order.push(change.status.to_string());
            their_statuses.push(change.status);
        }
    }
    assert_eq!(
        their_statuses,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Completed]
    );
    assert_eq!(
        their_progress,
        [half],
        "progress is announced with its batch, before the end"
    );
    assert_eq!(
        their_order,
        ["queued", "running", "progress 0.5", "completed"]
    );
    // Log lines are announced too, in a batch every 100 ms.
    assert_eq!(their_log, [line]);
    // A's own change was announced too, before b's: a published it once.
    assert_eq!(own_events, 1);
}

/// A statement that records hundreds of status changes at once (a big
/// batch of ends) announces every one to the other nodes, in groups that
/// each fit a notification, long messages included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_changes_in_one_statement_are_all_announced() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let lease = Duration::from_secs(30);
    let a = node(&url, &schema, "a", lease).await;
    let b = node(&url, &schema, "b", lease).await;
    let mut heard = b.subscribe();
    let mut runs = std::collections::HashSet::new();
    for _ in 0..300 {
        let run = Run::new("hello", "Hello");
        a.add_run(&run).await.unwrap();
        runs.insert(run.run_id);
    }
    // A listener of the test's own sees the notifications themselves.
    let (listener, mut connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (notes, mut noted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(note) = message {
                let _ = notes.send(note.payload().to_owned());
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN {schema}_events"))
        .await
        .unwrap();
    // A statement that records no change announces nothing: the first
    // notification is that of the one-change statement after it.
    admin(
        &url,
        &format!(
            "SET search_path = {schema}; SET modrun.node = 'a'; \
             INSERT INTO run_history (run, seq, status, at) \
             SELECT id, history_len + 10, 'running', 1 FROM runs WHERE false; \
             INSERT INTO run_history (run, seq, status, at, message) \
             SELECT id, history_len + 10, 'running', 1, 'alone' FROM runs ORDER BY id LIMIT 1"
        ),
    )
    .await;
    let first = tokio::time::timeout(DEADLINE, noted.recv())
        .await
        .expect("the change is announced")
        .unwrap();
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["node"], "a");
    assert_eq!(first["statuses"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(first["statuses"][0][4], "alone");
    // One statement, as node a's writer would send it: a failure for
    // each run, every 50th with a message of 900 control characters
    // (5,400 bytes once escaped) and every 50th with 1,000 two-byte ones.
    admin(
        &url,
        &format!(
            "SET search_path = {schema}; SET modrun.node = 'a'; \
             INSERT INTO run_history (run, seq, status, at, message) \
             SELECT id, history_len, 'failed', 1, CASE WHEN id % 50 = 7 THEN repeat(E'\\x01', 900) \
             WHEN id % 50 = 9 THEN repeat('é', 1000) ELSE 'line ' || id END FROM runs"
        ),
    )
    .await;
    let mut failed = std::collections::HashMap::new();
    while failed.len() < runs.len() {
        let event = tokio::time::timeout(DEADLINE, heard.recv())
            .await
            .expect("every change reaches b")
            .unwrap();
        if let modrun::RunEvent::Status { run_id, change, .. } = event
            && change.status == RunStatus::Failed
        {
            assert!(runs.contains(&run_id), "{run_id} is one of the runs");
            let message = change.message.unwrap();
            assert!(
                failed.insert(run_id, message).is_none(),
                "each change is announced once"
            );
        }
    }
    let long = |c: char, n: usize| {
        failed
            .values()
            .filter(|m| m.chars().count() == n && m.chars().all(|x| x == c))
            .count()
    };
    assert_eq!(long('\u{1}', 900), 6);
    assert_eq!(long('é', 1000), 6);
    let lines = failed.values().filter(|m| m.starts_with("line ")).count();
    assert_eq!(lines, 288);
    // They came in several notifications, each within PostgreSQL's limit.
    let mut announced = 0;
    let mut notifications = 0;
    while announced < runs.len() {
        let payload = tokio::time::timeout(DEADLINE, noted.recv())
            .await
            .expect("every group is announced")
            .unwrap();
        assert!(payload.len() < 8000, "{} bytes", payload.len());
        let group: serde_json::Value = serde_json::from_str(&payload).unwrap();
        announced += group["statuses"].as_array().unwrap().len();
        notifications += 1;
    }
    assert_eq!(announced, runs.len());
    assert!(notifications > 1, "{notifications} notifications");
}

/// A cleanup removes the history rows of the runs it removes, and only
/// theirs: nothing is left behind for a run that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_removes_the_history_of_the_runs_it_removes() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let a = node(&url, &schema, "a", Duration::from_secs(30)).await;
    let (old, kept) = (Run::new("hello", "Hello"), Run::new("hello", "Hello"));
    for run in [&old, &kept] {
        a.add_run(run).await.unwrap();
        assert!(
            a.transition(&Transition::running(&run.run_id))
                .await
                .unwrap()
        );
    }
    let mut done = Transition::completed(&old.run_id, json!(1));
    done.at = chrono::Utc::now() - chrono::Duration::days(30);
    assert!(a.transition(&done).await.unwrap());
    assert!(
        a.transition(&Transition::completed(&kept.run_id, json!(2)))
            .await
            .unwrap()
    );
    let all = scalar(&url, &format!("SELECT count(*) FROM {schema}.run_history")).await;
    assert_eq!(all, 6, "three entries each");
    let day = Duration::from_secs(86_400);
    assert_eq!(a.cleanup_old_runs(day).await.unwrap(), 1);
    let left = scalar(&url, &format!("SELECT count(*) FROM {schema}.run_history")).await;
    assert_eq!(left, 3, "only the kept run's entries are left");
    assert_eq!(a.history(&kept.run_id).await.unwrap().len(), 3);
}

/// Runs `query` on a connection of its own to the test server, closed
/// once it has answered.
async fn on_server<T>(url: &str, query: impl AsyncFnOnce(&tokio_postgres::Client) -> T) -> T {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let answer = query(&client).await;
    drop(client);
    let _ = driver.await;
    answer
}

/// Runs SQL on the test server as its administrator.
async fn admin(url: &str, sql: &str) {
    on_server(url, async |client| client.batch_execute(sql).await.unwrap()).await;
}

/// The first column of the first row of a query on the test server.
async fn scalar(url: &str, sql: &str) -> i64 {
    on_server(url, async |client| {
        client.query_one(sql, &[]).await.unwrap().get(0)
    })
    .await
}

/// `url` with another user.
fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{host}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_listener_lost_its_connection_reads_what_it_missed() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let lease = Duration::from_secs(30);
    // B creates the schema; A connects as a user of its own, whose new
    // connections can be refused while A's listener is down.
    let b = node(&url, &schema, "b", lease).await;
    let role = fresh_schema();
    admin(&url, &format!("CREATE ROLE {role} LOGIN SUPERUSER")).await;
    let a = node(&as_user(&url, &role), &schema, "a", lease).await;
    let (_, _, mut heard) = a.feed().resume(None);
    let listening = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' \
         AND application_name LIKE 'modrun-listener %' AND query LIKE '%cancel_requested_at IS NOT NULL'"
    );
    let start = Instant::now();
    while scalar(&url, &listening).await == 0 {
        assert!(start.elapsed() < DEADLINE, "a's listener never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A's listener loses its connection and cannot connect again.
    admin(
        &url,
        &format!(
            "ALTER ROLE {role} NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = '{role}' AND application_name LIKE 'modrun-listener %'"
        ),
    )
    .await;
    // Meanwhile B records a run from start to end: its announcements go
    // to nobody on A.
    let missed = Run::new("hello", "Hello");
    b.add_run(&missed).await.unwrap();
    assert!(
        b.transition(&Transition::running(&missed.run_id))
            .await
            .unwrap()
    );
    assert!(
        b.transition(&Transition::completed(&missed.run_id, json!("done")))
            .await
            .unwrap()
    );
    admin(&url, &format!("ALTER ROLE {role} LOGIN")).await;

    // Once connected again, A reads them from the database, in order.
    let mut statuses = Vec::new();
    while statuses.len() < 3 {
        let numbered = tokio::time::timeout(DEADLINE, heard.recv())
            .await
            .expect("a reads what it missed once it listens again")
            .unwrap();
        if let modrun::RunEvent::Status { run_id, change, .. } = &*numbered.event
            && *run_id == missed.run_id
        {
            statuses.push(change.status);
        }
    }
    assert_eq!(
        statuses,
        [RunStatus::Queued, RunStatus::Running, RunStatus::Completed]
    );
    drop(a);
    let _ = tokio::time::timeout(DEADLINE, async {
        loop {
            let dropped = on_server(&url, async |client| {
                client
                    .batch_execute(&format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'; \
                         DROP ROLE {role}"
                    ))
                    .await
            })
            .await;
            if dropped.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_asked_of_a_lost_node_is_settled_as_cancelled() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    // The lost node's lease is short, the survivor's long: however loaded
    // the machine, only the node the test loses is lost.
    let lost = node(&url, &schema, "lost", Duration::from_secs(2)).await;
    let survivor = node(&url, &schema, "survivor", Duration::from_secs(30)).await;
    let run = Run::new("countdown", "Countdown");
    lost.add_run(&run).await.unwrap();
    assert!(
        lost.transition(&Transition::running(&run.run_id))
            .await
            .unwrap()
    );
    // Nobody on "lost" handles the request: it stays asked.
    assert_eq!(
        survivor
            .request_cancel(&run.run_id)
            .await
            .unwrap()
            .as_deref(),
        Some("lost")
    );
    drop(lost);
    let run = wait_for(&survivor, &run.run_id, RunStatus::Cancelled).await;
    assert!(run.error_message.unwrap().starts_with("cancelled by user"),);
    assert_eq!(survivor.request_cancel(&run.run_id).await.unwrap(), None);
}

/// A `modrun serve` node named `name`. Its lease is `lease_seconds` long:
/// short for the tests that lose a node on purpose, the product's 30 s for
/// the others, so that a loaded machine loses no node they need.
fn start_node(plugins: &Path, url: &str, name: &str, lease_seconds: u32) -> Server {
    Server::start(
        plugins,
        Path::new(url),
        &["--node", name, "--node-lease", &lease_seconds.to_string()],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_a_database_and_a_killed_ones_runs_are_settled() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let plugins = plugins_dir(&["hello", "countdown"]);
    let mut nodes = vec![
        ("a", start_node(plugins.path(), &url, "a", 2)),
        ("b", start_node(plugins.path(), &url, "b", 2)),
    ];

    // Runs started on either node run on either; both see every run.
    let on_a = nodes[0].1.start_run("hello", json!({"name": "A"}));
    let on_b = nodes[1].1.start_run("hello", json!({"name": "B"}));
    nodes[0].1.wait_status(&on_b, "completed");
    nodes[1].1.wait_status(&on_a, "completed");
    let (_, listing) = nodes[0].1.get("/runs");
    assert_eq!(listing["runs"].as_array().unwrap().len(), 2, "{listing}");
    // The dashboard of either shows both nodes.
    for (_, node) in &nodes {
        let overview = ureq::get(&format!("{}/", node.base))
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap();
        for name in ["a", "b"] {
            assert!(
                overview.contains(&format!("<td class=\"node\">{name}</td>")),
                "node {name} is not on the overview:\n{overview}"
            );
        }
    }

    // A cancel sent to the node that does not execute a run reaches the
    // one that does.
    let cancelled = nodes[0]
        .1
        .start_run("countdown", json!({"seconds": 60, "step_ms": 10}));
    nodes[0].1.wait_status(&cancelled, "running");
    let executor = executing_node(&nodes[0].1, &cancelled);
    let other = nodes.iter().find(|(name, _)| *name != executor).unwrap();
    let (status, body) = other.1.delete(&format!("/runs/{cancelled}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");

    // kill -9 the node executing a run: the other settles it within its lease.
    let long = nodes[1]
        .1
        .start_run("countdown", json!({"seconds": 60, "step_ms": 10}));
    nodes[1].1.wait_status(&long, "running");
    let executor = executing_node(&nodes[1].1, &long);
    let killed = nodes
        .iter()
        .position(|(name, _)| *name == executor)
        .unwrap();
    let killed_at = Instant::now();
    drop(nodes.remove(killed));
    let survivor = &nodes[0].1;
    survivor.wait_status(&long, "failed");
    let (_, body) = survivor.get(&format!("/runs/{long}"));
    let message = body["run"]["error_message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("node lost: {executor} stopped renewing")),
        "{message}"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "settled after {:?}, with a 2 s lease",
        killed_at.elapsed()
    );
    // And the survivor keeps working.
    let after = survivor.start_run("hello", json!({"name": "again"}));
    survivor.wait_status(&after, "completed");
}

/// The node executing a run, as any node reports it.
fn executing_node(server: &Server, run_id: &str) -> String {
    let (_, body) = server.get(&format!("/runs/{run_id}"));
    body["run"]["node"]
        .as_str()
        .unwrap_or_else(|| panic!("no node executes {run_id}: {body}"))
        .to_owned()
}

/// A PostgreSQL server of the test's own, in a temporary directory, that
/// the test may stop and start (the shared test server must stay up).
struct PrivateServer {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivateServer {
    /// `None`, after saying the test was skipped, without Debian's
    /// PostgreSQL server binaries or root (to run them as `postgres`).
    fn start() -> Option<PrivateServer> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max();
        let root = unsafe { libc::geteuid() } == 0;
        let Some(bin) = bin.filter(|_| root) else {
            return crate::support::require_or_skip(
                "PostgreSQL's server binaries (/usr/lib/postgresql/*/bin) and root",
            );
        };
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        run_as_postgres(
            &[
                "chown",
                "-R",
                "postgres:",
                &dir.path().display().to_string(),
            ],
            true,
        );
        let data = dir.path().join("data");
        run_as_postgres(
            &[
                &bin.join("initdb").display().to_string(),
                "-D",
                &data.display().to_string(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "--no-instructions",
            ],
            false,
        );
        let server = PrivateServer { bin, dir, port };
        server.up();
        Some(server)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data").display().to_string();
        let log = self.dir.path().join("log").display().to_string();
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let mut command = vec![pg_ctl.as_str(), "-D", &data, "-l", &log, "-w", "-t", "60"];
        command.extend_from_slice(args);
        run_as_postgres(&command, false);
    }

    fn up(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.path().display()
        );
        self.pg_ctl(&["-o", &options, "start"]);
    }

    fn down(&self) {
        self.pg_ctl(&["-m", "fast", "stop"]);
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let _ = std::process::Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &pg_ctl,
                "-D",
                &data,
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}

/// Runs a command (as `postgres` unless `as_root`), failing the test if it fails.
fn run_as_postgres(command: &[&str], as_root: bool) {
    let mut process = if as_root {
        std::process::Command::new(command[0])
    } else {
        let mut process = std::process::Command::new("runuser");
        process.args(["-u", "postgres", "--", command[0]]);
        process
    };
    let output = process.args(&command[1..]).output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_loses_no_run() {
    let Some(server) = PrivateServer::start() else {
        return;
    };
    let registry = RunRegistry::open_postgres(&server.url()).await.unwrap();
    let mut runs = Vec::new();
    for _ in 0..20 {
        let run = Run::new("countdown", "Countdown");
        registry.add_run(&run).await.unwrap();
        assert!(
            registry
                .transition(&Transition::running(&run.run_id))
                .await
                .unwrap()
        );
        runs.push(run.run_id);
    }

    server.down();
    // The runs end while the server is down: their ends are held.
    let ends: Vec<_> = runs
        .iter()
        .map(|run_id| {
            let (registry, run_id) = (registry.clone(), run_id.clone());
            tokio::spawn(async move {
                registry
                    .hold_transition(&Transition::completed(&run_id, json!("done")))
                    .await
            })
        })
        .collect();
    let start = Instant::now();
    while registry.health().unavailable.is_none() {
        assert!(start.elapsed() < DEADLINE, "the outage was never noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reason = registry.health().unavailable.unwrap();
    assert!(reason.contains("database server"), "{reason}");
    // What someone waits for is refused, not queued behind the outage.
    let refused = registry
        .add_run(&Run::new("hello", "Hello"))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, modrun::Error::RegistryUnavailable { .. }),
        "{refused:?}"
    );

    server.up();
    for end in ends {
        assert!(end.await.unwrap().unwrap(), "every held end commits");
    }
    assert_eq!(registry.health().unavailable, None);
    for run_id in &runs {
        let run = registry.get_run(run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Completed);
        assert_eq!(registry.history(run_id).await.unwrap().len(), 3);
    }
    let after = Run::new("hello", "Hello");
    registry.add_run(&after).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_take_3000_starts_and_every_run_ends_once() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let plugins = plugins_dir(&["hello"]);
    let nodes: Vec<Server> = ["n1", "n2", "n3"]
        .iter()
        .map(|name| start_node(plugins.path(), &url, name, 30))
        .collect();
    let bases: Vec<String> = nodes.iter().map(|node| node.base.clone()).collect();
    // Ten clients, each spreading its starts over the three nodes.
    let clients: Vec<_> = (0..10)
        .map(|client| {
            let bases = bases.clone();
            std::thread::spawn(move || {
                (0..300)
                    .map(|index| {
                        let base = &bases[(client + index) % bases.len()];
                        let mut response = ureq::post(&format!("{base}/modules/hello/runs"))
                            .send_json(json!({"name": format!("{client}-{index}")}))
                            .expect("start accepted");
                        let body: serde_json::Value = response.body_mut().read_json().unwrap();
                        body["run_id"].as_str().unwrap().to_owned()
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let started: Vec<String> = clients
        .into_iter()
        .flat_map(|client| client.join().unwrap())
        .collect();
    assert_eq!(started.len(), 3000);

    // Every run is recorded once and ends once, whichever node is asked.
    let registry = RunRegistry::open_postgres(&url).await.unwrap();
    let start = Instant::now();
    loop {
        let active = registry.active_runs().await.unwrap().len();
        if active == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{active} runs never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let completed = registry.runs_by_status(RunStatus::Completed).await.unwrap();
    assert_eq!(
        completed.len(),
        3000,
        "every start completed, none lost, none doubled"
    );
    let distinct: std::collections::HashSet<&str> =
        completed.iter().map(|run| run.run_id.as_str()).collect();
    let handed_out: std::collections::HashSet<&str> = started.iter().map(String::as_str).collect();
    assert_eq!(distinct, handed_out);
    for run in completed.iter().step_by(97) {
        let statuses: Vec<RunStatus> = registry
            .history(&run.run_id)
            .await
            .unwrap()
            .iter()
            .map(|change| change.status)
            .collect();
        assert_eq!(
            statuses,
            [RunStatus::Queued, RunStatus::Running, RunStatus::Completed]
        );
    }
    let (_, listing) = nodes[2].get("/runs?limit=10000");
    assert_eq!(listing["runs"].as_array().unwrap().len(), 3000);
}

/// Sends `signal` to a server's process.
fn signal(server: &Server, signal: &str) {
    let pid = server.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_its_lease_finds_its_run_rerun_elsewhere_and_cannot_overwrite_it() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let plugins = plugins_dir(&["countdown"]);
    std::fs::write(
        plugins.path().join("countdown.toml"),
        "[limits]\nretry_on_node_loss = true\nmax_attempts = 3\n",
    )
    .unwrap();
    let nodes = [
        ("a", start_node(plugins.path(), &url, "a", 2)),
        ("b", start_node(plugins.path(), &url, "b", 2)),
    ];
    let run_id = nodes[0]
        .1
        .start_run("countdown", json!({"seconds": 4, "step_ms": 50}));
    nodes[0].1.wait_status(&run_id, "running");
    let frozen_name = executing_node(&nodes[0].1, &run_id);
    let (frozen, other) = if frozen_name == "a" {
        (&nodes[0], &nodes[1])
    } else {
        (&nodes[1], &nodes[0])
    };

    // Its listening session, which the server keeps notifications for.
    let listener = listener_of(&url, frozen.0).await;
    assert_eq!(sessions_named(&url, &listener).await, 1, "{listener}");

    // Frozen past its 2 s lease: the other node re-queues the run, claims
    // it and runs it to the end, and ends the frozen node's listening
    // session (frozen, it would hold the server's notification queue).
    signal(&frozen.1, "-STOP");
    other
        .1
        .wait_status_within(&run_id, "completed", Duration::from_secs(60));
    let start = Instant::now();
    while sessions_named(&url, &listener).await > 0 {
        assert!(start.elapsed() < DEADLINE, "the frozen node still listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, body) = other.1.get(&format!("/runs/{run_id}"));
    assert_eq!(body["run"]["node"], other.0, "{body}");
    assert_eq!(body["run"]["attempt"], 2, "{body}");
    let requeued = body["history"][2]["message"].as_str().unwrap();
    assert!(
        requeued.starts_with(&format!("node lost: {} stopped renewing", frozen.0)),
        "{requeued}"
    );

    // Thawed, the frozen node's own attempt (its countdown is long over)
    // ends or is stopped, and records nothing over the result.
    signal(&frozen.1, "-CONT");
    let start = Instant::now();
    while frozen.1.metric("modrun_active_runs") != Some(0.0) {
        assert!(start.elapsed() < DEADLINE, "the frozen node still runs it");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, after) = other.1.get(&format!("/runs/{run_id}"));
    assert_eq!(after["run"], body["run"], "the result stands");
    assert_eq!(after["history"].as_array().unwrap().len(), 5, "{after}");
}

/// The application name of `node`'s listening session, as its lease row
/// has it (`modrun serve` nodes, schema `modrun`), once it has one.
async fn listener_of(url: &str, node: &str) -> String {
    on_server(url, async |client| {
        let start = Instant::now();
        loop {
            let row = client
                .query_opt(
                    "SELECT listener FROM modrun.nodes WHERE node_id = $1 AND listener IS NOT NULL",
                    &[&node],
                )
                .await
                .unwrap();
            if let Some(row) = row {
                return row.get(0);
            }
            assert!(start.elapsed() < DEADLINE, "node {node} has no lease row");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// How many sessions of the test server are named `application`.
async fn sessions_named(url: &str, application: &str) -> i64 {
    scalar(
        url,
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = '{application}'"
        ),
    )
    .await
}

/// Starts a hello on `base` with an idempotency key; the status and body.
fn start_keyed(base: &str, key: &str) -> Option<(u16, serde_json::Value)> {
    let mut response = ureq::post(&format!("{base}/modules/hello/runs"))
        .header("Idempotency-Key", key)
        .config()
        .http_status_as_error(false)
        .build()
        .send_json(json!({"name": key}))
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.body_mut().read_json().unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_lose_no_run_when_the_database_restarts_under_load() {
    let Some(database) = PrivateServer::start() else {
        return;
    };
    let plugins = plugins_dir(&["hello"]);
    let url = database.url();
    let node = |name: &str| start_node(plugins.path(), &url, name, 30);
    let nodes = [node("a"), node("b")];
    let bases: Vec<String> = nodes.iter().map(|node| node.base.clone()).collect();

    // A client starts runs on both nodes without pause, retrying each
    // start (with its key, on the other node) until one is accepted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let client = {
        let (stop, accepted, bases) = (stop.clone(), accepted.clone(), bases.clone());
        std::thread::spawn(move || {
            let mut refused = 0;
            let mut attempt = 0;
            for n in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return refused;
                }
                let key = format!("start-{n}");
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    attempt += 1;
                    match start_keyed(&bases[attempt % 2], &key) {
                        Some((202, body)) => {
                            let run_id = body["run_id"].as_str().unwrap().to_owned();
                            accepted.lock().unwrap().push((key, run_id));
                            break;
                        }
                        other => {
                            refused += 1;
                            assert!(Instant::now() < deadline, "never accepted: {other:?}");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            }
            refused
        })
    };
    let count = || accepted.lock().unwrap().len();
    let wait_for = |wanted: usize| {
        let start = Instant::now();
        while count() < wanted {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} accepted",
                count()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(50);
    database.down();
    let during = count();
    std::thread::sleep(Duration::from_secs(2));
    database.up();
    wait_for(during + 100);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = client.join().unwrap();
    assert!(refused > 0, "the outage was never felt");

    // Every accepted start ran to completion, once.
    let accepted = accepted.lock().unwrap().clone();
    for (key, run_id) in &accepted {
        nodes[0].wait_status_within(run_id, "completed", Duration::from_secs(60));
        let (_, run) = nodes[1].get(&format!("/runs/{run_id}"));
        assert_eq!(run["run"]["parameters"]["name"], key.as_str());
    }
    let (_, listing) = nodes[0].get("/runs?limit=10000");
    let runs = listing["runs"].as_array().unwrap();
    assert_eq!(runs.len(), accepted.len(), "one run per accepted start");
}
