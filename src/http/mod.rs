//! The HTTP API: start, watch and cancel runs of modules; list modules;
//! a live event stream; health, metrics and an OpenAPI document.
//!
//! [`router`] builds the whole API over an [`AppState`], so tests can call
//! it without a socket. The guide's endpoints (`POST
//! /modules/{id}/run-async`, `DELETE /tasks/{id}`, `GET /tasks/active`) are
//! served beside the REST ones they alias.

mod error;
mod events;
mod handlers;
mod metrics;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use subtle::ConstantTimeEq;

pub use error::ApiError;
pub use metrics::Metrics;

use crate::module::ModuleRunner;

/// The largest request body accepted (start parameters).
pub const MAX_BODY_BYTES: usize = 256 << 10;

/// What every handler shares. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Starts and cancels runs; holds the module host, manager and registry.
    pub runner: ModuleRunner,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// The bearer token every request but `/health` must carry, if set.
    pub token: Option<Arc<str>>,
}

impl AppState {
    /// State over `runner`, counting from now; `token` guards the API.
    #[must_use]
    pub fn new(runner: ModuleRunner, token: Option<String>) -> AppState {
        let metrics = Metrics::watch(&runner);
        AppState {
            runner,
            metrics,
            token: token.map(Arc::from),
        }
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/modules", get(handlers::list_modules))
        .route("/modules/{module_id}", get(handlers::get_module))
        .route("/modules/{module_id}/runs", post(handlers::start_run))
        .route("/modules/{module_id}/run-async", post(handlers::start_run))
        .route("/runs", get(handlers::list_runs))
        .route("/runs/active", get(handlers::active_runs))
        .route("/tasks/active", get(handlers::active_runs))
        .route(
            "/runs/{run_id}",
            get(handlers::get_run).delete(handlers::cancel_run),
        )
        .route("/tasks/{run_id}", delete(handlers::cancel_run))
        .route("/events", get(events::stream))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(handlers::openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(handlers::health))
        .merge(api)
        .fallback(handlers::no_such_endpoint)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Refuses requests without the configured bearer token. The comparison
/// takes the same time whatever the token sent, so timing tells nothing.
async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(token) = &state.token else {
        return Ok(next.run(request).await);
    };
    let sent = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(sent.as_bytes().ct_eq(token.as_bytes())) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required: send `Authorization: Bearer <token>`",
        ))
    }
}
