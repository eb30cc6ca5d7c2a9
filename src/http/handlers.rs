//! The request handlers: each checks its input, calls the runner, and
//! answers JSON.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::DateTime;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{ApiPath, ApiQuery};
use super::{ApiError, AppState};
use crate::error::Error;
use crate::module::{CancelAnswer, ModuleId};
use crate::registry::{RunCursor, RunFilter};
use crate::run::{RunStatus, StartOptions};

/// The runs a listing returns unless asked for another number.
const DEFAULT_PAGE: usize = 100;
/// The most runs one page of a listing may hold.
const MAX_PAGE: usize = 10_000;

/// The API's own description, served at `/openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

/// 200 "ok", or 503 "degraded" while the registry cannot write (with why).
pub(super) async fn health(State(state): State<AppState>) -> Response {
    let registry = state.runner.registry().health();
    let (code, status) = match registry.unavailable {
        None => (StatusCode::OK, "ok"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "degraded"),
    };
    let body = json!({
        "status": status,
        "modules": state.runner.host().module_ids().len(),
        "active_runs": state.runner.manager().active_task_count(),
        "registry": {
            "available": registry.unavailable.is_none(),
            "reason": registry.unavailable,
            "held_writes": registry.held_writes,
        },
    });
    (code, Json(body)).into_response()
}

pub(super) async fn openapi() -> Response {
    ([("content-type", "application/json")], OPENAPI).into_response()
}

pub(super) async fn no_such_endpoint(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_such_endpoint",
        format!("no endpoint at {}; see /openapi.json", uri.path()),
    )
}

pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on {}; see /openapi.json",
            uri.path()
        ),
    )
}

pub(super) async fn list_modules(State(state): State<AppState>) -> Json<Value> {
    let host = state.runner.host();
    Json(json!({ "modules": host.modules(), "failures": host.failures() }))
}

fn checked_module_id(module_id: &str) -> Result<(), ApiError> {
    ModuleId::new(module_id)?;
    Ok(())
}

pub(super) async fn get_module(
    State(state): State<AppState>,
    ApiPath(module_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    checked_module_id(&module_id)?;
    let module = state
        .runner
        .host()
        .module(&module_id)
        .ok_or(Error::UnknownModule(module_id))?;
    Ok(Json(json!(module)))
}

/// What a start's query string may say: `priority` (an integer from
/// -32768 to 32767, higher starts first), and when the run may start,
/// either `not_before` (an RFC 3339 time) or `delay` (500ms, 30s, 2h).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StartQuery {
    priority: Option<String>,
    not_before: Option<String>,
    delay: Option<String>,
}

impl StartQuery {
    /// The start options it says, with the request's idempotency key.
    fn options(self, headers: &HeaderMap) -> Result<StartOptions, ApiError> {
        let invalid =
            |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_start", message);
        let mut options = StartOptions::new();
        if let Some(priority) = self.priority {
            options = options.priority(priority.trim().parse().map_err(|_| {
                invalid(format!(
                    "priority must be an integer from {} to {}, not {priority:?}",
                    i16::MIN,
                    i16::MAX
                ))
            })?);
        }
        match (self.not_before, self.delay) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "give not_before or delay, not both: both say when the run may start".into(),
                ));
            }
            (Some(at), None) => {
                let at = crate::module::parse_start_time(&at)
                    .map_err(|e| invalid(format!("not_before {e}")))?;
                options = options.not_before(at);
            }
            (None, Some(delay)) => {
                let delay = crate::module::parse_delay(&delay)
                    .map_err(|e| invalid(format!("delay {delay:?}: {e}")))?;
                options = options.delay(delay);
            }
            (None, None) => {}
        }
        if let Some(key) = headers.get("idempotency-key") {
            let key = key.to_str().map_err(|_| {
                Error::InvalidIdempotencyKey(String::from_utf8_lossy(key.as_bytes()).into_owned())
            })?;
            options = options.idempotency_key(key);
        }
        Ok(options)
    }
}

pub(super) async fn start_run(
    State(state): State<AppState>,
    ApiPath(module_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<StartQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    checked_module_id(&module_id)?;
    let options = query.options(&headers)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is over {} bytes", super::MAX_BODY_BYTES),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                rejection.body_text(),
            )
        }
    })?;
    let empty = body.iter().all(u8::is_ascii_whitespace);
    check_json_content_type(&headers, empty)?;
    let parameters: Value = if empty {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {e}"),
            )
        })?
    };
    // A retried start with the same key gets the first start's run.
    let run_id = state
        .runner
        .start_with(&module_id, parameters, &options)
        .await?;
    let accepted = json!({"run_id": run_id, "task_id": run_id, "status": "queued"});
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

/// What `POST /cleanup` asks for.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CleanupRequest {
    older_than: String,
    #[serde(default)]
    statuses: Vec<RunStatus>,
    module_id: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

/// Removes finished runs completed more than `older_than` ago (of the
/// given statuses and module), with their history and logs, or with
/// `dry_run` only counts them: `{"removed": n, "dry_run": b, "before": t}`.
pub(super) async fn cleanup(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        ApiError::new(rejection.status(), "unreadable_body", rejection.body_text())
    })?;
    check_json_content_type(&headers, false)?;
    let request: CleanupRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_cleanup",
            format!("the body is not a cleanup request: {e}"),
        )
    })?;
    let age = crate::module::parse_age(&request.older_than).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_cleanup",
            format!("older_than: {e}"),
        )
    })?;
    if let Some(active) = request.statuses.iter().find(|s| s.is_active()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_cleanup",
            format!("{active} runs are active and never removed; choose finished statuses"),
        ));
    }
    if let Some(module_id) = &request.module_id {
        checked_module_id(module_id)?;
    }
    let cleanup = crate::registry::Cleanup {
        statuses: request.statuses,
        module_id: request.module_id,
        ..crate::registry::Cleanup::older_than(age)
    };
    let registry = state.runner.registry();
    let removed = if request.dry_run {
        registry.count_finished(&cleanup).await?
    } else {
        registry.cleanup(&cleanup).await?
    };
    Ok(Json(json!({
        "removed": removed,
        "dry_run": request.dry_run,
        "before": cleanup.before,
    }))
    .into_response())
}

/// A body must be declared JSON: a page on another site can send a
/// `text/plain` or form body without asking, never a JSON one. An empty
/// body without a content type is no parameters.
fn check_json_content_type(headers: &HeaderMap, empty: bool) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .map(|value| value.to_str().unwrap_or("(not text)"));
    let is_json = |value: &str| {
        let essence = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"))
    };
    match declared {
        None if empty => Ok(()),
        Some(value) if is_json(value) => Ok(()),
        declared => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the body must be sent as `Content-Type: application/json`, not {}",
                declared.map_or("without a content type".to_owned(), |v| format!("{v:?}"))
            ),
        )),
    }
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    status: Option<String>,
    module: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// One page of run summaries, newest first, and the cursor of the next
/// page when there may be one. A run's output and log come from
/// `GET /runs/{id}`.
pub(super) async fn list_runs(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let statuses = query
        .status
        .iter()
        .flat_map(|list| list.split(','))
        .filter(|name| !name.is_empty())
        .map(parse_status)
        .collect::<Result<Vec<_>, _>>()?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            format!("limit must be from 1 to {MAX_PAGE}, not {limit}; page with `cursor`"),
        ));
    }
    let after = query.cursor.as_deref().map(parse_cursor).transpose()?;
    let filter = RunFilter {
        statuses,
        module_id: query.module.filter(|module| !module.is_empty()),
        limit: Some(limit),
        after,
    };
    let runs = state.runner.registry().list_summaries(&filter).await?;
    let next_cursor = next_cursor(&runs, limit);
    Ok(Json(json!({ "runs": runs, "next_cursor": next_cursor })))
}

/// A status named in a query, or a 400 `invalid_status` saying why not.
pub(super) fn parse_status(name: &str) -> Result<RunStatus, ApiError> {
    name.parse::<RunStatus>()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_status", e.to_string()))
}

/// The cursor of the page after `runs`, a page of at most `limit`: none
/// when the page was not full. Written `<created-at in ns>.<run id>`.
pub(super) fn next_cursor(runs: &[crate::registry::RunSummary], limit: usize) -> Option<String> {
    let last = runs.last().filter(|_| runs.len() == limit)?;
    Some(format!(
        "{}.{}",
        last.created_at.timestamp_nanos_opt().unwrap_or(0),
        last.run_id
    ))
}

/// A cursor as `list_runs` hands it out: `<created-at in ns>.<run id>`.
pub(super) fn parse_cursor(cursor: &str) -> Result<RunCursor, ApiError> {
    cursor
        .split_once('.')
        .and_then(|(nanos, run_id)| {
            let nanos = nanos.parse::<i64>().ok()?;
            (!run_id.is_empty()).then(|| RunCursor {
                created_at: DateTime::from_timestamp_nanos(nanos),
                run_id: run_id.to_owned(),
            })
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_cursor",
                format!("{cursor:?} is not a cursor; pass the next_cursor of a previous page"),
            )
        })
}

pub(super) async fn active_runs(State(state): State<AppState>) -> Json<Value> {
    let manager = state.runner.manager();
    let mut ids = manager.active_task_ids();
    ids.sort();
    Json(json!({
        "count": ids.len(),
        "queued": manager.queued_task_count(),
        "tasks": ids,
    }))
}

pub(super) async fn get_run(
    State(state): State<AppState>,
    ApiPath(run_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let registry = state.runner.registry();
    let run = registry
        .get_run(&run_id)
        .await?
        .ok_or_else(|| Error::RunNotFound(run_id.clone()))?;
    let history = registry.history(&run_id).await?;
    Ok(Json(json!({ "run": run, "history": history })))
}

/// How long a cancel waits for the node executing the run to cancel it.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for another node to cancel `run_id`, as asked, and says how it ended.
async fn cancel_elsewhere(
    state: &AppState,
    run_id: &str,
    node: &str,
) -> Result<Response, ApiError> {
    let registry = state.runner.registry();
    let mut events = registry.subscribe();
    let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
    loop {
        let run = registry
            .get_run(run_id)
            .await?
            .ok_or_else(|| Error::RunNotFound(run_id.to_owned()))?;
        match run.status {
            RunStatus::Cancelled => return Ok(cancelled()),
            status if status.is_terminal() => return Ok(not_cancelled(run_id, status)),
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            let answer = json!({"success": true, "status": "cancel_requested", "node": node});
            return Ok((StatusCode::ACCEPTED, Json(answer)).into_response());
        }
        // The executing node's status change arrives as an event; a poll
        // covers a missed one.
        let _ = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + std::time::Duration::from_millis(200)),
            async {
                while let Ok(event) = events.recv().await {
                    if event.run_id() == run_id {
                        return;
                    }
                }
            },
        )
        .await;
    }
}

/// Cancels a run: 200 `{"success": true}` when it was active and is now
/// cancelled, 404 for an unknown run, 409 `{"success": false}` when it had
/// already finished. A run another node executes (on a shared database)
/// is cancelled through that node: 200 once it is cancelled, 202
/// `{"status": "cancel_requested"}` if that takes longer than
/// [`CANCEL_WAIT`], 409 if it finished first.
pub(super) async fn cancel_run(
    State(state): State<AppState>,
    ApiPath(run_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    match state.runner.cancel_or_ask(&run_id).await? {
        CancelAnswer::Cancelled => Ok(cancelled()),
        CancelAnswer::Asked(node) => cancel_elsewhere(&state, &run_id, &node).await,
        CancelAnswer::NotActive => {
            let run = state
                .runner
                .registry()
                .get_run(&run_id)
                .await?
                .ok_or_else(|| Error::RunNotFound(run_id.clone()))?;
            // Finished; or active in another process that cannot be asked.
            Ok(not_cancelled(&run_id, run.status))
        }
    }
}

/// 200: the run is cancelled.
fn cancelled() -> Response {
    Json(json!({"success": true, "status": "cancelled"})).into_response()
}

/// 409: the run was not cancelled, as it is `status`: finished, or active
/// in another process sharing the registry that cannot be asked.
fn not_cancelled(run_id: &str, status: RunStatus) -> Response {
    let error = if status.is_active() {
        json!({
            "code": "run_elsewhere",
            "message": format!(
                "run {run_id} is {status} in another modrun process sharing this registry; \
                 cancel it through that process"
            ),
        })
    } else {
        json!({"code": "run_finished", "message": format!("run {run_id} already {status}")})
    };
    let answer = json!({"success": false, "status": status, "error": error});
    (StatusCode::CONFLICT, Json(answer)).into_response()
}
