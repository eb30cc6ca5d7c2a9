use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::StreamExt;
use modrun::http::{AppState, router};
use modrun::{BackgroundTaskManager, ModuleHost, ModuleRunner, RunRegistry};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::{DEADLINE, plugins_dir, test_host_config};

async fn app(token: Option<&str>) -> (Router, ModuleRunner, tempfile::TempDir) {
    let dir = plugins_dir(&["hello", "countdown"]);
    let host = ModuleHost::new(test_host_config()).unwrap();
    host.load_dir(dir.path()).await.unwrap();
    let runner = ModuleRunner::new(host, BackgroundTaskManager::new(RunRegistry::in_memory()));
    let state = AppState::new(runner.clone(), token.map(str::to_owned));
    (router(state), runner, dir)
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: &str,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut headers = vec![];
    if let Some(token) = token {
        headers.push(("authorization", format!("Bearer {token}")));
    }
    if !body.is_empty() {
        headers.push(("content-type", "application/json".to_owned()));
    }
    call_with(app, method, uri, body, &headers).await
}

/// A request with exactly these headers.
async fn call_with(
    app: &Router,
    method: &str,
    uri: &str,
    body: &str,
    headers: &[(&str, String)],
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn wait_finished(app: &Router, run_id: &str) -> Value {
    let start = std::time::Instant::now();
    loop {
        let (status, body) = call(app, "GET", &format!("/runs/{run_id}"), "", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if ["completed", "failed", "cancelled"].contains(&body["run"]["status"].as_str().unwrap()) {
            return body;
        }
        assert!(start.elapsed() < DEADLINE, "run {run_id} did not finish");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_started_over_http_is_followed_to_its_end() {
    let (app, _, _dir) = app(None).await;
    let (status, body) = call(
        &app,
        "POST",
        "/modules/hello/runs",
        r#"{"name": "Ada"}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "queued");
    let run_id = body["run_id"].as_str().unwrap().to_owned();

    let finished = wait_finished(&app, &run_id).await;
    assert_eq!(finished["run"]["status"], "completed");
    assert_eq!(
        finished["run"]["output"],
        json!({"greeting": "Hello, Ada!"})
    );
    let history: Vec<&str> = finished["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|change| change["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["queued", "running", "completed"]);

    // The guide's path starts runs too.
    let (status, body) = call(&app, "POST", "/modules/hello/run-async", "", None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_finished(&app, body["task_id"].as_str().unwrap()).await;

    let (status, body) = call(
        &app,
        "GET",
        "/runs?module=hello&status=completed&limit=1",
        "",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["runs"].as_array().unwrap().len(), 1);
    let (_, body) = call(&app, "GET", "/runs?module=countdown", "", None).await;
    assert_eq!(body["runs"], json!([]));
    let (status, body) = call(&app, "GET", "/runs?status=sleeping", "", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_status");

    let (_, body) = call(&app, "GET", "/tasks/active", "", None).await;
    assert_eq!(body, json!({"count": 0, "queued": 0, "tasks": []}));
    let (_, body) = call(&app, "GET", "/modules", "", None).await;
    let ids: Vec<&str> = body["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["countdown", "hello"]);
    let (_, body) = call(&app, "GET", "/modules/hello", "", None).await;
    assert!(
        body["content_hash"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(body["parameters_schema"]["type"], "object");
    let (_, body) = call(&app, "GET", "/health", "", None).await;
    assert_eq!(body["status"], "ok");
    let (status, metrics) = call(&app, "GET", "/metrics", "", None).await;
    assert_eq!(status, StatusCode::OK);
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("modrun_runs_total{status=\"completed\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modrun_run_duration_seconds_count 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_clear_json_error_and_records_no_run() {
    let (app, runner, _dir) = app(None).await;
    let cases = [
        (
            "POST",
            "/modules/nope/runs",
            "{}",
            StatusCode::NOT_FOUND,
            "unknown_module",
        ),
        (
            "POST",
            "/modules/hello/runs",
            r#"{"name": 5}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameters",
        ),
        (
            "POST",
            "/modules/hello/runs",
            r#"{"name": "#,
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "POST",
            "/modules/hello/runs",
            "[1, 2]",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameters",
        ),
        (
            "POST",
            "/modules/%2e%2e/runs",
            "{}",
            StatusCode::BAD_REQUEST,
            "invalid_module_id",
        ),
        (
            "POST",
            "/modules/..%2Fetc/runs",
            "{}",
            StatusCode::BAD_REQUEST,
            "invalid_module_id",
        ),
        (
            "POST",
            "/modules/%2Fetc%2Fpasswd/runs",
            "{}",
            StatusCode::BAD_REQUEST,
            "invalid_module_id",
        ),
        (
            "POST",
            "/modules/a%00b/runs",
            "{}",
            StatusCode::BAD_REQUEST,
            "invalid_module_id",
        ),
        (
            "GET",
            "/modules/Hello",
            "",
            StatusCode::BAD_REQUEST,
            "invalid_module_id",
        ),
        (
            "GET",
            "/runs/no-such-run",
            "",
            StatusCode::NOT_FOUND,
            "unknown_run",
        ),
        (
            "DELETE",
            "/runs/no-such-run",
            "",
            StatusCode::NOT_FOUND,
            "unknown_run",
        ),
        (
            "GET",
            "/no/such/endpoint",
            "",
            StatusCode::NOT_FOUND,
            "no_such_endpoint",
        ),
    ];
    for (method, uri, body, status, code) in cases {
        let (got, answer) = call(&app, method, uri, body, None).await;
        assert_eq!(got, status, "{method} {uri}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{method} {uri}: {answer}");
        assert!(!answer["error"]["message"].as_str().unwrap().is_empty());
    }
    let (_, answer) = call(&app, "POST", "/modules/hello/runs", r#"{"name": 5}"#, None).await;
    assert_eq!(
        answer["error"]["details"][0],
        "/name: 5 is not of type \"string\""
    );
    let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(300 << 10));
    let (status, answer) = call(&app, "POST", "/modules/hello/runs", &huge, None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["error"]["code"], "body_too_large");
    assert!(
        runner.registry().recent_runs(10).await.unwrap().is_empty(),
        "no run recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_token_is_required_everywhere_but_health() {
    let (app, _, _dir) = app(Some("s3cret-token")).await;
    for token in [None, Some("wrong"), Some("s3cret-tokenX"), Some("")] {
        let (status, body) = call(&app, "GET", "/runs", "", token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let (status, _) = call(&app, "POST", "/modules/hello/runs", "{}", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(&app, "GET", "/runs", "", Some("s3cret-token")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&app, "GET", "/health", "", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_over_http_tells_cancelled_from_finished() {
    let (app, _, _dir) = app(None).await;
    let (_, body) = call(
        &app,
        "POST",
        "/modules/countdown/runs",
        r#"{"seconds": 30, "step_ms": 20}"#,
        None,
    )
    .await;
    let run_id = body["run_id"].as_str().unwrap().to_owned();
    let start = std::time::Instant::now();
    loop {
        let (_, body) = call(&app, "GET", &format!("/runs/{run_id}"), "", None).await;
        if body["run"]["status"] == "running" {
            break;
        }
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (status, body) = call(&app, "DELETE", &format!("/runs/{run_id}"), "", None).await;
    assert_eq!(
        (status, body["success"].clone()),
        (StatusCode::OK, json!(true)),
        "{body}"
    );
    let (status, body) = call(&app, "DELETE", &format!("/tasks/{run_id}"), "", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["success"], false);
    assert_eq!(body["status"], "cancelled");
    let (_, body) = call(&app, "GET", &format!("/runs/{run_id}"), "", None).await;
    assert_eq!(body["run"]["error_message"], "cancelled by user");
}

/// One Server-Sent Event: its name, id and data.
#[derive(Debug)]
struct Sse {
    event: String,
    id: Option<String>,
    data: String,
}

/// Reads `/events` (with these headers) until `until` holds for an event,
/// or the deadline passes.
async fn read_events(
    app: &Router,
    uri: &str,
    headers: &[(&str, String)],
    until: impl Fn(&Sse) -> bool,
) -> Vec<Sse> {
    let mut request = Request::get(uri);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.into_body().into_data_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = text.find("\n\n") {
                let frame: String = text.drain(..end + 2).collect();
                let field = |name: &str| {
                    frame
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::to_owned)
                };
                let Some(event) = field("event: ") else {
                    continue; // a keep-alive comment
                };
                let sse = Sse {
                    event,
                    id: field("id: "),
                    data: field("data: ").unwrap_or_default(),
                };
                let done = until(&sse);
                events.push(sse);
                if done {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the awaited event did not arrive; saw {events:?}"));
    events
}

fn completed(event: &Sse) -> bool {
    event.event == "status" && event.data.contains("\"status\":\"completed\"")
}

fn feed_seq(id: &str) -> u64 {
    id.split_once('-').unwrap().1.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_opens_with_a_snapshot_then_follows_the_run() {
    let (app, _, _dir) = app(None).await;
    let (_, body) = call(
        &app,
        "POST",
        "/modules/countdown/runs",
        r#"{"seconds": 0.2, "step_ms": 50}"#,
        None,
    )
    .await;
    let run_id = body["run_id"].as_str().unwrap().to_owned();
    let events = read_events(&app, &format!("/events?run_id={run_id}"), &[], completed).await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.first(), Some(&"snapshot"), "{events:?}");
    assert!(names.contains(&"progress"), "{events:?}");
    assert!(
        events.iter().all(|e| e.data.contains(&run_id)),
        "{events:?}"
    );
    let (status, _) = call(&app, "GET", "/events?run_id=unknown", "", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_with_last_event_id_gets_every_event_it_missed_once() {
    let (app, runner, _dir) = app(None).await;
    let (_, body) = call(
        &app,
        "POST",
        "/modules/countdown/runs",
        r#"{"seconds": 0.3, "step_ms": 20}"#,
        None,
    )
    .await;
    let run_id = body["run_id"].as_str().unwrap().to_owned();
    let uri = format!("/events?run_id={run_id}");
    // Watch until the first progress report, then go away.
    let before = read_events(&app, &uri, &[], |e| e.event == "progress").await;
    let last = before.last().unwrap().id.clone().expect("events carry ids");
    // The run ends while nobody watches.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let run = runner.registry().get_run(&run_id).await.unwrap().unwrap();
        if run.status.is_terminal() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the run did not end");
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let resumed = read_events(&app, &uri, &[("last-event-id", last.clone())], completed).await;
    // No snapshot: exactly the events after the one seen, in order.
    assert!(resumed.iter().all(|e| e.event != "snapshot"), "{resumed:?}");
    let seqs: Vec<u64> = resumed
        .iter()
        .map(|e| feed_seq(e.id.as_deref().unwrap()))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(seqs[0] > feed_seq(&last), "{seqs:?} after {last}");
    assert!(resumed.iter().any(|e| e.event == "progress"), "{resumed:?}");

    // An id from another server (or an earlier run of this one): the
    // client is told, and gets the state again.
    let foreign = read_events(
        &app,
        &uri,
        &[("last-event-id", "00000000-5".to_owned())],
        |e| e.event == "snapshot",
    )
    .await;
    assert_eq!(foreign[0].event, "reset", "{foreign:?}");
    assert!(foreign[1].data.contains("\"status\":\"completed\""));
    let (status, body) = call_with(
        &app,
        "GET",
        &uri,
        "",
        &[("last-event-id", "yesterday".to_owned())],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_last_event_id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_exactly_the_served_endpoints() {
    let (app, _, _dir) = app(None).await;
    let (status, doc) = call(&app, "GET", "/openapi.json", "", None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    for (path, operations) in paths {
        let mut concrete = path
            .replace("{module_id}", "hello")
            .replace("{run_id}", "some-run");
        if path == "/events" {
            // The stream of all runs never ends; one unknown run answers at once.
            concrete.push_str("?run_id=some-run");
        }
        for method in operations.as_object().unwrap().keys() {
            let (status, body) = call(&app, &method.to_uppercase(), &concrete, "{}", None).await;
            assert_ne!(
                body["error"]["code"], "no_such_endpoint",
                "{method} {path} is documented but not served ({status})"
            );
        }
    }
    // And what is served is documented.
    for path in [
        "/health",
        "/modules",
        "/modules/{module_id}",
        "/modules/{module_id}/runs",
        "/modules/{module_id}/run-async",
        "/runs",
        "/runs/active",
        "/tasks/active",
        "/runs/{run_id}",
        "/tasks/{run_id}",
        "/events",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} is served but not documented"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_other_sites_cannot_drive_a_server_without_a_token() {
    let (app, runner, _dir) = app(None).await;
    let json_body = || ("content-type", "application/json".to_owned());
    let refused = [
        // DNS rebinding: a page of evil.example resolved to 127.0.0.1.
        (
            "GET",
            "/runs",
            vec![("host", "evil.example:8080".to_owned())],
            StatusCode::FORBIDDEN,
            "host_not_allowed",
        ),
        (
            "POST",
            "/modules/hello/runs",
            vec![("host", "evil.example".to_owned()), json_body()],
            StatusCode::FORBIDDEN,
            "host_not_allowed",
        ),
        // A cross-site form or fetch: the browser says where it comes from.
        (
            "POST",
            "/modules/hello/runs",
            vec![
                ("host", "127.0.0.1:8080".to_owned()),
                ("origin", "https://evil.example".to_owned()),
                json_body(),
            ],
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
        ),
        (
            "DELETE",
            "/runs/some-run",
            vec![
                ("host", "localhost:8080".to_owned()),
                ("origin", "http://localhost:3000".to_owned()),
            ],
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
        ),
        (
            "POST",
            "/modules/hello/runs",
            vec![("origin", "null".to_owned()), json_body()],
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
        ),
        // A body a page can send without asking first.
        (
            "POST",
            "/modules/hello/runs",
            vec![("content-type", "text/plain".to_owned())],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/modules/hello/runs",
            vec![(
                "content-type",
                "application/x-www-form-urlencoded".to_owned(),
            )],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/modules/hello/runs",
            vec![],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ];
    for (method, uri, headers, status, code) in refused {
        let body = if method == "POST" {
            r#"{"name": "Mallory"}"#
        } else {
            ""
        };
        let (got, answer) = call_with(&app, method, uri, body, &headers).await;
        assert_eq!(got, status, "{method} {uri} {headers:?}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{method} {uri} {headers:?}");
    }
    assert_eq!(runner.registry().recent_runs(10).await.unwrap(), vec![]);

    // The server's own pages, command-line clients, and loopback names pass.
    for headers in [
        vec![
            ("host", "127.0.0.1:8080".to_owned()),
            ("origin", "http://127.0.0.1:8080".to_owned()),
            json_body(),
        ],
        vec![("host", "localhost:8080".to_owned()), json_body()],
        vec![
            ("host", "[::1]:8080".to_owned()),
            ("content-type", "application/json; charset=utf-8".to_owned()),
        ],
        vec![json_body()],
    ] {
        let (got, answer) = call_with(
            &app,
            "POST",
            "/modules/hello/runs",
            r#"{"name": "Ada"}"#,
            &headers,
        )
        .await;
        assert_eq!(got, StatusCode::ACCEPTED, "{headers:?}: {answer}");
    }
    let (got, _) = call_with(&app, "POST", "/modules/hello/runs", "", &[]).await;
    assert_eq!(
        got,
        StatusCode::ACCEPTED,
        "an empty body needs no content type"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_hosts_and_origins_are_let_in_with_cors_and_no_others_get_cors() {
    let dir = plugins_dir(&["hello"]);
    let host = ModuleHost::new(test_host_config()).unwrap();
    host.load_dir(dir.path()).await.unwrap();
    let runner = ModuleRunner::new(host, BackgroundTaskManager::new(RunRegistry::in_memory()));
    let policy = modrun::http::BrowserPolicy {
        allowed_hosts: vec!["runs.internal".into()],
        cors_origins: vec!["https://app.example".into()],
    };
    let app = router(AppState::new(runner, None).with_browser_policy(policy));
    let (got, _) = call_with(
        &app,
        "GET",
        "/runs",
        "",
        &[("host", "runs.internal:8080".into())],
    )
    .await;
    assert_eq!(got, StatusCode::OK);
    let (got, _) = call_with(
        &app,
        "POST",
        "/modules/hello/runs",
        "{}",
        &[
            ("host", "runs.internal".into()),
            ("origin", "https://app.example".into()),
            ("content-type", "application/json".into()),
        ],
    )
    .await;
    assert_eq!(got, StatusCode::ACCEPTED);

    let preflight = Request::builder()
        .method("OPTIONS")
        .uri("/modules/hello/runs")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(preflight).await.unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let other = Request::builder()
        .uri("/runs")
        .header("origin", "https://evil.example")
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(other).await.unwrap();
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );

    // Without configured origins, no CORS headers at all.
    let (plain, _, _dir) = self::app(None).await;
    let request = Request::builder()
        .uri("/runs")
        .header("origin", "http://127.0.0.1:8080")
        .body(Body::empty())
        .unwrap();
    let response = plain.oneshot(request).await.unwrap();
    assert!(
        !response
            .headers()
            .keys()
            .any(|name| name.as_str().starts_with("access-control"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_path_and_method_errors_are_json_and_match_the_document() {
    let (app, _, _dir) = app(None).await;
    for (method, uri, status, code) in [
        (
            "GET",
            "/runs?limit=-5881",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/runs?limit=ten",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/runs?limit=10001",
            StatusCode::BAD_REQUEST,
            "invalid_limit",
        ),
        (
            "GET",
            "/runs?limit=0",
            StatusCode::BAD_REQUEST,
            "invalid_limit",
        ),
        (
            "GET",
            "/runs?cursor=nonsense",
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
        ),
        (
            "GET",
            "/runs/%FF%FE",
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "DELETE",
            "/tasks/%C3%28",
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "GET",
            "/modules/%FF",
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "PUT",
            "/runs",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ] {
        let (got, answer) = call(&app, method, uri, "", None).await;
        assert_eq!(got, status, "{method} {uri}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{method} {uri}: {answer}");
    }
    for uri in [
        "/runs?status=",
        "/runs?status=&module=",
        "/runs?limit=10000",
        "/runs?status=completed,",
    ] {
        let (got, answer) = call(&app, "GET", uri, "", None).await;
        assert_eq!(got, StatusCode::OK, "{uri}: {answer}");
    }
    let (_, doc) = call(&app, "GET", "/openapi.json", "", None).await;
    let limit = doc["paths"]["/runs"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap();
    assert_eq!(limit["schema"]["maximum"], 10000);
    assert_eq!(limit["schema"]["minimum"], 1);
    let links = &doc["paths"]["/modules/{module_id}/runs"]["post"]["responses"]["202"]["links"];
    for link in ["GetRun", "CancelRun"] {
        let operation = links[link]["operationId"].as_str().unwrap();
        assert!(
            doc["paths"].as_object().unwrap().values().any(|ops| ops
                .as_object()
                .unwrap()
                .values()
                .any(|op| op["operationId"] == operation)),
            "link {link} names no operation"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_small_summaries_paged_by_cursor() {
    let dir = plugins_dir(&["abuse"]);
    let host = ModuleHost::new(test_host_config()).unwrap();
    host.load_dir(dir.path()).await.unwrap();
    let runner = ModuleRunner::new(host, BackgroundTaskManager::new(RunRegistry::in_memory()));
    let app = router(AppState::new(runner.clone(), None));
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = runner
            .start("abuse", json!({"mode": "output", "bytes": 1 << 19}))
            .await
            .unwrap();
        ids.push(id);
    }
    runner.manager().wait_all().await;
    let mut seen = Vec::new();
    let mut uri = "/runs?limit=2".to_owned();
    loop {
        let (status, page) = call(&app, "GET", &uri, "", None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for run in page["runs"].as_array().unwrap() {
            assert!(
                run.get("output").is_none()
                    && run.get("parameters").is_none()
                    && run.get("log").is_none(),
                "{run}"
            );
            assert_eq!(run["status"], "completed");
            seen.push(run["run_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/runs?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "every run once, newest first");
    let (_, one) = call(&app, "GET", &format!("/runs/{}", ids[0]), "", None).await;
    assert_eq!(one["run"]["output"].as_str().unwrap().len(), (1 << 19) - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_cannot_write_makes_health_degraded_and_starts_503() {
    let dir = plugins_dir(&["hello"]);
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("registry.db");
    let host = ModuleHost::new(test_host_config()).unwrap();
    host.load_dir(dir.path()).await.unwrap();
    let registry = RunRegistry::open_sqlite(&db).unwrap();
    let runner = ModuleRunner::new(host, BackgroundTaskManager::new(registry.clone()));
    let app = router(AppState::new(runner, None));
    let (status, health) = call(&app, "GET", "/health", "", None).await;
    assert_eq!(
        (status, &health["registry"]["available"]),
        (StatusCode::OK, &json!(true))
    );

    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (status, answer) = call(&app, "POST", "/modules/hello/runs", "{}", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"]["code"], "registry_unavailable");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lock"),
        "{answer}"
    );
    let (status, health) = call(&app, "GET", "/health", "", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health["status"], "degraded");
    assert!(
        health["registry"]["reason"]
            .as_str()
            .unwrap()
            .contains("lock")
    );
    let (status, _) = call(&app, "GET", "/runs", "", None).await;
    assert_eq!(status, StatusCode::OK, "committed runs can still be read");

    other.execute_batch("ROLLBACK").unwrap();
    let started = std::time::Instant::now();
    loop {
        let (status, answer) = call(&app, "POST", "/modules/hello/runs", "{}", None).await;
        if status == StatusCode::ACCEPTED {
            break;
        }
        assert_eq!(answer["error"]["code"], "registry_unavailable");
        assert!(started.elapsed() < DEADLINE, "starts were not taken again");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, health) = call(&app, "GET", "/health", "", None).await;
    assert_eq!((status, &health["status"]), (StatusCode::OK, &json!("ok")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_retried_with_an_idempotency_key_returns_the_first_run() {
    let (app, runner, _dir) = app(None).await;
    let keyed = |key: &str| {
        vec![
            ("content-type", "application/json".to_owned()),
            ("idempotency-key", key.to_owned()),
        ]
    };
    let (status, first) = call_with(
        &app,
        "POST",
        "/modules/hello/runs",
        r#"{"name": "Ada"}"#,
        &keyed("order-1"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, again) = call_with(
        &app,
        "POST",
        "/modules/hello/run-async",
        r#"{"name": "Ada"}"#,
        &keyed("order-1"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["run_id"], first["run_id"]);

    let (status, reused) = call_with(
        &app,
        "POST",
        "/modules/hello/runs",
        r#"{"name": "Grace"}"#,
        &keyed("order-1"),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{reused}");
    assert_eq!(reused["error"]["code"], "idempotency_key_reused");
    assert!(
        reused["error"]["message"]
            .as_str()
            .unwrap()
            .contains(first["run_id"].as_str().unwrap()),
        "{reused}"
    );
    let (status, bad) = call_with(
        &app,
        "POST",
        "/modules/hello/runs",
        r#"{"name": "Ada"}"#,
        &keyed(&"x".repeat(300)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert_eq!(bad["error"]["code"], "invalid_idempotency_key");
    assert_eq!(
        runner
            .registry()
            .runs_by_module("hello")
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_can_carry_a_priority_and_a_time_before_which_it_waits() {
    let (app, runner, _dir) = app(None).await;
    let start = |query: &str| {
        let uri = format!("/modules/hello/runs?{query}");
        let app = app.clone();
        async move { call(&app, "POST", &uri, r#"{"name": "Ada"}"#, None).await }
    };
    for (query, code) in [
        ("priority=high", "invalid_start"),
        ("priority=40000", "invalid_start"),
        ("not_before=tomorrow", "invalid_start"),
        ("delay=soon", "invalid_start"),
        ("delay=1h&not_before=2030-01-01T00:00:00Z", "invalid_start"),
        ("not_before=9999-01-01T00:00:00Z", "time_out_of_range"),
        ("priorty=5", "invalid_query"),
    ] {
        let (status, body) = start(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
    }
    assert!(
        runner
            .registry()
            .runs_by_module("hello")
            .await
            .unwrap()
            .is_empty(),
        "a refused start records nothing"
    );

    let (status, later) = start("priority=-7&delay=1h").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{later}");
    let run_id = later["run_id"].as_str().unwrap();
    let (_, shown) = call(&app, "GET", &format!("/runs/{run_id}"), "", None).await;
    assert_eq!(shown["run"]["status"], "queued", "{shown}");
    assert_eq!(shown["run"]["priority"], -7, "{shown}");
    let not_before: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(shown["run"]["not_before"].clone()).unwrap();
    assert!(not_before > chrono::Utc::now() + chrono::TimeDelta::minutes(59));
    let (status, _) = call(&app, "DELETE", &format!("/runs/{run_id}"), "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        wait_finished(&app, run_id).await["run"]["status"],
        "cancelled"
    );

    let asked = chrono::Utc::now() + chrono::TimeDelta::milliseconds(200);
    let (status, short) = start("delay=200ms").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{short}");
    let ended = wait_finished(&app, short["run_id"].as_str().unwrap()).await;
    let started: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(ended["run"]["started_at"].clone()).unwrap();
    assert!(started >= asked, "a delay under a second is kept: {ended}");

    let at = (chrono::Utc::now() + chrono::TimeDelta::milliseconds(300)).to_rfc3339();
    let (status, soon) = start(&format!("priority=3&not_before={}", at.replace('+', "%2B"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{soon}");
    let ended = wait_finished(&app, soon["run_id"].as_str().unwrap()).await;
    assert_eq!(ended["run"]["status"], "completed", "{ended}");
    let started: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(ended["run"]["started_at"].clone()).unwrap();
    let at: chrono::DateTime<chrono::Utc> = at.parse().unwrap();
    assert!(started >= at, "started {started}, not before {at}");
}
