//! The HTTP API: start, watch and cancel runs of modules; list modules;
//! a live event stream; health, metrics and an OpenAPI document; and the
//! web dashboard over it, at `/` (`ui`).
//!
//! [`router`] builds the whole API over an [`AppState`], so tests can call
//! it without a socket. The guide's endpoints (`POST
//! /modules/{id}/run-async`, `DELETE /tasks/{id}`, `GET /tasks/active`) are
//! served beside the REST ones they alias.

mod browser;
mod error;
mod events;
mod extract;
mod handlers;
mod metrics;
mod ui;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use subtle::ConstantTimeEq;

pub use browser::BrowserPolicy;
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
    /// Who may reach the API from a browser.
    pub browser: Arc<BrowserPolicy>,
}

impl AppState {
    /// State over `runner`, counting from now; `token` guards the API.
    /// Browsers reach it from loopback names and its own pages only.
    #[must_use]
    pub fn new(runner: ModuleRunner, token: Option<String>) -> AppState {
        let metrics = Metrics::watch(&runner);
        AppState {
            runner,
            metrics,
            token: token.map(Arc::from),
            browser: Arc::default(),
        }
    }

    /// The same state with this browser policy.
    #[must_use]
    pub fn with_browser_policy(mut self, policy: BrowserPolicy) -> AppState {
        self.browser = Arc::new(policy);
        self
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
        .route("/cleanup", post(handlers::cleanup))
        .route("/openapi.json", get(handlers::openapi))
        .route("/", get(ui::overview))
        .route("/ui/runs", get(ui::runs))
        .route("/ui/runs/{run_id}", get(ui::run))
        .route("/ui/modules", get(ui::modules))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let cors = cors_layer(&state.browser);
    let app = Router::new()
        .route("/health", get(handlers::health))
        .route("/ui/sign-in", get(ui::sign_in_form).post(ui::sign_in))
        .route("/ui/sign-out", post(ui::sign_out))
        .route("/ui/assets/{file}", get(ui::assets))
        .merge(api)
        .fallback(handlers::no_such_endpoint)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            browser::guard,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    match cors {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// CORS for the configured origins; none at all when there are none.
fn cors_layer(policy: &BrowserPolicy) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method, header};
    if policy.cors_origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = policy
        .cors_origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::HeaderName::from_static("last-event-id"),
            ]),
    )
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
    // The dashboard's pages, and the API calls they make, carry the
    // session cookie of the sign-in form instead.
    if bool::from(sent.as_bytes().ct_eq(token.as_bytes()))
        || ui::has_session(request.headers(), token)
    {
        Ok(next.run(request).await)
    } else if ui::is_page(request.uri().path()) {
        Ok(ui::sign_in_redirect(request.uri().path()))
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required: send `Authorization: Bearer <token>`",
        ))
    }
}
