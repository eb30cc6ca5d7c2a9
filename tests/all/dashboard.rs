//! The web dashboard in a real browser: headless Chromium driven over
//! WebDriver against a real `modrun serve`. Each test saves screenshots
//! into `target/tmp/screenshots/<test>/`. Without Chromium and its driver
//! the tests say they were skipped (and fail under `CI=true`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::server::Server;
use crate::support::{DEADLINE, plugins_dir, require_or_skip};

/// A headless Chromium and the WebDriver that drives it.
struct Browser {
    client: Client,
    driver: Child,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

/// Finds a program on the `PATH`.
fn program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// A fresh browser for `test`, or `None` (skipped) without Chromium.
    async fn open(test: &str) -> Option<Browser> {
        let (Some(chromium), Some(chromedriver)) = (program("chromium"), program("chromedriver"))
        else {
            return require_or_skip(
                "Chromium and its WebDriver (apt-get install chromium chromium-driver)",
            );
        };
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < DEADLINE, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        capabilities.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session");
        let shots = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("screenshots")
            .join(test);
        std::fs::create_dir_all(&shots).unwrap();
        Some(Browser {
            client,
            driver,
            shots,
            _profile: profile,
        })
    }

    /// Saves what the browser shows now as `<name>.png`.
    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// The text of the first element `css` selects, once it contains
    /// `wanted`; fails the test after [`DEADLINE`].
    async fn wait_for_text(&self, css: &str, wanted: &str) -> String {
        let started = Instant::now();
        let mut last = String::new();
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await
                && let Ok(text) = element.text().await
            {
                if text.contains(wanted) {
                    return text;
                }
                last = text;
            }
            if started.elapsed() > DEADLINE {
                self.shot("timeout").await;
                panic!("{css} did not show {wanted:?} in time; it shows {last:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens the modules page of the server at `base`, once hello's card
    /// is on it.
    async fn open_modules(&self, base: &str) {
        self.client
            .goto(&format!("{base}/ui/modules"))
            .await
            .unwrap();
        self.wait_for_text("#module-hello h2", "Hello").await;
    }

    /// Types `text` into the element `css` selects.
    async fn type_into(&self, css: &str, text: &str) {
        let element = self.client.find(Locator::Css(css)).await.unwrap();
        element.send_keys(text).await.unwrap();
    }

    /// Clicks the element `css` selects.
    async fn click(&self, css: &str) {
        let element = self.client.find(Locator::Css(css)).await.unwrap();
        element.click().await.unwrap();
    }

    async fn url(&self) -> String {
        self.client.current_url().await.unwrap().to_string()
    }

    /// What the page's scripts logged as errors since the last look
    /// (failed requests the page expects, such as a 422, aside).
    async fn console_errors(&self) -> Vec<String> {
        let log = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("the browser's log");
        log.as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["level"] == "SEVERE" && entry["source"] != "network")
            .map(|entry| entry["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Closes the browser, failing the test if a page logged an error.
    async fn close(mut self) {
        let errors = self.console_errors().await;
        assert!(errors.is_empty(), "the console shows errors: {errors:#?}");
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// ChromeDriver's browser log (`/se/log`), which WebDriver itself lacks.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(r#"{"type": "browser"}"#.to_owned()),
        )
    }
}

/// A server over a fresh plugins directory with `ids`, and its registry's
/// folder.
fn server(ids: &[&str], extra: &[&str]) -> (Server, tempfile::TempDir, tempfile::TempDir) {
    let plugins = plugins_dir(ids);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(plugins.path(), &data.path().join("registry.db"), extra);
    (server, plugins, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_started_from_the_generated_form_completes_on_screen() {
    let Some(browser) = Browser::open("start_from_form").await else {
        return;
    };
    let (server, _plugins, _data) = server(&["hello", "countdown"], &[]);
    let page = &browser.client;
    browser.open_modules(&server.base).await;
    // The schema bounds the field: 11 is over `times`' maximum of 10.
    browser
        .type_into("#module-hello input[name=name]", "Ada")
        .await;
    browser
        .type_into("#module-hello input[name=times]", "11")
        .await;
    browser.click("#module-hello button[type=submit]").await;
    let problem = browser
        .wait_for_text("#module-hello .field-error[data-for=times]", "10")
        .await;
    assert!(problem.contains("maximum"), "{problem}");
    browser.shot("schema-error").await;

    let times = page
        .find(Locator::Css("#module-hello input[name=times]"))
        .await
        .unwrap();
    times.clear().await.unwrap();
    times.send_keys("2").await.unwrap();
    browser.click("#module-hello button[type=submit]").await;
    browser.wait_for_text("#run-status", "completed").await;
    assert!(browser.url().await.contains("/ui/runs/"));
    browser
        .wait_for_text("#output", "Hello, Ada! Hello, Ada!")
        .await;
    browser.wait_for_text("#log", "greeting Ada").await;
    browser.shot("completed").await;

    // The runs page shows a run started elsewhere as it happens: no reload.
    page.goto(&format!("{}/ui/runs", server.base))
        .await
        .unwrap();
    browser.wait_for_text("h1", "Runs").await;
    // Long enough that a loaded machine's browser sees it running.
    let run_id = server.start_run("countdown", json!({"seconds": 3}));
    let row = format!("tr[data-run=\"{run_id}\"] .status");
    browser.wait_for_text(&row, "running").await;
    browser.wait_for_text(&row, "completed").await;
    // Event to screen: from the recorded end to the row showing it (to
    // within the 20 ms this test polls at). Reported, not asserted.
    let seen = chrono::Utc::now();
    let (_, found) = server.get(&format!("/runs/{run_id}"));
    let ended: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(found["run"]["completed_at"].clone()).unwrap();
    eprintln!(
        "event to screen: the end of a run showed on the open runs page {} ms after it was recorded",
        (seen - ended).num_milliseconds()
    );
    browser.shot("runs-live").await;

    // The overview counts them, and charts the last hour.
    page.goto(&format!("{}/", server.base)).await.unwrap();
    browser.wait_for_text("figcaption", "2 completed").await;
    browser.wait_for_text("table.modules", "countdown").await;
    browser.shot("overview").await;
    // At phone width the pages still fit.
    page.set_window_size(390, 844).await.unwrap();
    let overflow = page
        .execute(
            "return document.documentElement.scrollWidth > window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(overflow, json!(false), "the overview is wider than a phone");
    browser.shot("overview-phone").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_button_cancels_a_running_countdown() {
    let Some(browser) = Browser::open("cancel").await else {
        return;
    };
    let (server, _plugins, _data) = server(&["countdown"], &[]);
    let run_id = server.start_run("countdown", json!({"seconds": 600}));
    server.wait_status(&run_id, "running");
    let page = &browser.client;
    page.goto(&format!("{}/ui/runs/{run_id}", server.base))
        .await
        .unwrap();
    browser.wait_for_text("#run-status", "running").await;
    browser.click("#cancel").await;
    browser.wait_for_text("#run-status", "cancelled").await;
    browser.wait_for_text("#timeline", "cancelled").await;
    browser.shot("cancelled").await;
    let (_, found) = server.get(&format!("/runs/{run_id}"));
    assert_eq!(found["run"]["status"], "cancelled");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_a_priority_and_a_delay_shows_both_and_runs_again_now_at_that_priority() {
    let Some(browser) = Browser::open("scheduled").await else {
        return;
    };
    let (server, _plugins, _data) = server(&["hello"], &[]);
    let page = &browser.client;
    browser.open_modules(&server.base).await;
    browser
        .type_into("#module-hello input[name=name]", "Later")
        .await;
    browser.type_into("#priority-hello", "4").await;
    browser.type_into("#delay-hello", "soon").await;
    browser.click("#module-hello button[type=submit]").await;
    browser
        .wait_for_text("#module-hello .form-error", "delay")
        .await;
    let delay = page.find(Locator::Css("#delay-hello")).await.unwrap();
    delay.clear().await.unwrap();
    delay.send_keys("1h").await.unwrap();
    browser.click("#module-hello button[type=submit]").await;
    browser.wait_for_text("#run-status", "queued").await;
    let facts = browser.wait_for_text("dl.facts", "Not before").await;
    assert!(facts.contains("Priority"), "{facts}");
    browser.shot("scheduled").await;
    let url = browser.url().await;
    let run_id = url.rsplit('/').next().unwrap().to_owned();
    let (_, found) = server.get(&format!("/runs/{run_id}"));
    assert_eq!(found["run"]["priority"], 4, "{found}");
    assert_eq!(found["run"]["parameters"]["name"], "Later", "{found}");

    // Run again: the same parameters and priority, but now, not in an
    // hour (the first run stays queued: only the new one can complete).
    browser.click("#run-again").await;
    browser.wait_for_text("#run-status", "completed").await;
    let again = browser.url().await.rsplit('/').next().unwrap().to_owned();
    assert_ne!(again, run_id);
    let (_, found) = server.get(&format!("/runs/{again}"));
    assert_eq!(found["run"]["priority"], 4, "{found}");
    assert_eq!(found["run"]["parameters"]["name"], "Later", "{found}");
    assert!(found["run"]["not_before"].is_null(), "{found}");
    browser.shot("run-again").await;
    page.goto(&format!("{}/ui/runs", server.base))
        .await
        .unwrap();
    browser.wait_for_text("#runs-body", "not before").await;
    assert_eq!(server.delete(&format!("/runs/{run_id}")).0, 200);
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_shows_its_error_and_its_log() {
    let Some(browser) = Browser::open("failed").await else {
        return;
    };
    let (server, _plugins, _data) = server(&["panic"], &[]);
    let run_id = server.start_run("panic", json!({}));
    server.wait_status(&run_id, "failed");
    browser
        .client
        .goto(&format!("{}/ui/runs/{run_id}", server.base))
        .await
        .unwrap();
    browser.wait_for_text("#run-status", "failed").await;
    let error = browser.wait_for_text("#error", "panicked").await;
    let (_, found) = server.get(&format!("/runs/{run_id}"));
    let run = &found["run"];
    assert_eq!(Value::String(error), run["error_message"]);
    let first_line = run["log"][0]["message"]
        .as_str()
        .unwrap()
        .lines()
        .next()
        .unwrap();
    browser.wait_for_text("#log", first_line).await;
    browser.shot("failed").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_component_shows_its_load_error_on_the_modules_page() {
    let Some(browser) = Browser::open("load_error").await else {
        return;
    };
    let (server, plugins, _data) = server(&["hello"], &[]);
    browser.open_modules(&server.base).await;
    std::fs::write(plugins.path().join("broken.wasm"), b"\0asm not a component").unwrap();
    // Hot reload sees it; the open page shows it without being told to.
    let error = browser.wait_for_text(".failures", "broken.wasm").await;
    assert!(error.contains("broken.wasm"), "{error}");
    browser.shot("load-error").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_signs_in_and_nothing_answers_without_it() {
    let Some(browser) = Browser::open("sign_in").await else {
        return;
    };
    let (server, _plugins, _data) = server(&["hello"], &["--token", "s3cret-token"]);
    // Without the token: pages send to the sign-in form, the API refuses.
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .build(),
    );
    for page in ["/", "/ui/runs", "/ui/modules", "/ui/runs/x"] {
        let response = agent.get(&format!("{}{page}", server.base)).call().unwrap();
        assert_eq!(response.status(), 303, "{page}");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        assert!(location.starts_with("/ui/sign-in?next="), "{location}");
    }
    for api in ["/runs", "/modules", "/events", "/metrics"] {
        let response = agent.get(&format!("{}{api}", server.base)).call().unwrap();
        assert_eq!(response.status(), 401, "{api}");
    }
    let forged = agent
        .get(&format!("{}/runs", server.base))
        .header("Cookie", "modrun_session=s3cret-token")
        .call()
        .unwrap();
    assert_eq!(forged.status(), 401, "the token itself is not a session");

    let page = &browser.client;
    page.goto(&format!("{}/ui/modules", server.base))
        .await
        .unwrap();
    assert!(browser.url().await.contains("/ui/sign-in"));
    browser.type_into("#token", "wrong").await;
    browser.click("button[type=submit]").await;
    browser.wait_for_text(".error", "not this server's").await;
    browser.shot("wrong-token").await;
    browser.type_into("#token", "s3cret-token").await;
    browser.click("button[type=submit]").await;
    // Back where it was going, signed in; the cookie is out of scripts' reach.
    browser.wait_for_text("h1", "Modules").await;
    assert!(browser.url().await.ends_with("/ui/modules"));
    let cookies = page
        .execute("return document.cookie", vec![])
        .await
        .unwrap();
    assert_eq!(cookies, json!(""));
    assert!(!browser.url().await.contains("s3cret"));

    // Signed in, the page's own API calls work: a start from the form.
    browser
        .type_into("#module-hello input[name=name]", "Bo")
        .await;
    browser.click("#module-hello button[type=submit]").await;
    browser.wait_for_text("#run-status", "completed").await;
    browser.shot("signed-in").await;
    browser.close().await;
}
