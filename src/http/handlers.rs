//! The request handlers: each checks its input, calls the runner, and
//! answers JSON.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::error::Error;
use crate::module::is_safe_module_id;
use crate::registry::RunFilter;
use crate::run::RunStatus;

/// The API's own description, served at `/openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

pub(super) async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "modules": state.runner.host().module_ids().len(),
        "active_runs": state.runner.manager().active_task_count(),
    }))
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

pub(super) async fn list_modules(State(state): State<AppState>) -> Json<Value> {
    let host = state.runner.host();
    Json(json!({ "modules": host.modules(), "failures": host.failures() }))
}

fn checked_module_id(module_id: &str) -> Result<(), ApiError> {
    if is_safe_module_id(module_id) {
        Ok(())
    } else {
        Err(Error::InvalidModuleId(module_id.to_owned()).into())
    }
}

pub(super) async fn get_module(
    State(state): State<AppState>,
    Path(module_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    checked_module_id(&module_id)?;
    let module = state
        .runner
        .host()
        .module(&module_id)
        .ok_or(Error::UnknownModule(module_id))?;
    Ok(Json(json!(module)))
}

pub(super) async fn start_run(
    State(state): State<AppState>,
    Path(module_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    checked_module_id(&module_id)?;
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
    let parameters: Value = if body.iter().all(u8::is_ascii_whitespace) {
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
    let run_id = state.runner.start(&module_id, parameters).await?;
    let accepted = json!({"run_id": run_id, "task_id": run_id, "status": "queued"});
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    status: Option<String>,
    module: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn list_runs(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let statuses = query
        .status
        .iter()
        .flat_map(|list| list.split(','))
        .map(|name| {
            name.parse::<RunStatus>().map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_status", e.to_string())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let filter = RunFilter {
        statuses,
        module_id: query.module,
        limit: Some(query.limit.unwrap_or(100).min(10_000)),
    };
    let runs = state.runner.registry().list_runs(&filter).await?;
    Ok(Json(json!({ "runs": runs })))
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
    Path(run_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let registry = state.runner.registry();
    let run = registry
        .get_run(&run_id)
        .await?
        .ok_or_else(|| Error::RunNotFound(run_id.clone()))?;
    let history = registry.history(&run_id).await?;
    Ok(Json(json!({ "run": run, "history": history })))
}

/// Cancels a run: 200 `{"success": true}` when it was active and is now
/// cancelled, 404 for an unknown run, 409 `{"success": false}` when it had
/// already finished.
pub(super) async fn cancel_run(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> Result<Response, ApiError> {
    if state.runner.cancel(&run_id).await? {
        return Ok(Json(json!({"success": true, "status": "cancelled"})).into_response());
    }
    let run = state
        .runner
        .registry()
        .get_run(&run_id)
        .await?
        .ok_or_else(|| Error::RunNotFound(run_id.clone()))?;
    let answer = json!({
        "success": false,
        "status": run.status,
        "error": {"code": "run_finished", "message": format!("run {run_id} already {}", run.status)},
    });
    Ok((StatusCode::CONFLICT, Json(answer)).into_response())
}
