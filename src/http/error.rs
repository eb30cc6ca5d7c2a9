//! Every error the API returns, in one JSON shape:
//! `{"error": {"code": "...", "message": "...", "details": [...]}}`.
//! Internal details are logged, not sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::Error;

/// An API error: a status code, a stable code word, a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Vec<String>,
}

impl ApiError {
    /// An error with this status, code word and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// The status code.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> ApiError {
        let message = error.to_string();
        let (status, code) = match &error {
            Error::UnknownModule(_) => (StatusCode::NOT_FOUND, "unknown_module"),
            Error::RunNotFound(_) => (StatusCode::NOT_FOUND, "unknown_run"),
            Error::InvalidModuleId(_) => (StatusCode::BAD_REQUEST, "invalid_module_id"),
            Error::InvalidParameters { problems, .. } => {
                return ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    code: "invalid_parameters",
                    message,
                    details: problems.clone(),
                };
            }
            Error::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            Error::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            // The registry logs once when it becomes unavailable; a flood of
            // refused requests must not flood the log.
            Error::RegistryUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "registry_unavailable")
            }
            Error::RunActive { .. } => (StatusCode::CONFLICT, "run_active"),
            Error::IdempotencyKeyReused { .. } => (StatusCode::CONFLICT, "idempotency_key_reused"),
            Error::InvalidIdempotencyKey(_) => (StatusCode::BAD_REQUEST, "invalid_idempotency_key"),
            Error::RunFinished { .. } => (StatusCode::CONFLICT, "run_finished"),
            Error::TimeOutOfRange(_) => (StatusCode::BAD_REQUEST, "time_out_of_range"),
            _ => {
                tracing::error!(%error, "request failed");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the server failed to handle the request; its log says why",
                );
            }
        };
        ApiError::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if !self.details.is_empty() {
            error["details"] = json!(self.details);
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}
