//! Every failure the API reports, as OpenAI reports it: an HTTP status and the error object
//! `{"error": {"message", "type", "param", "code"}}` (plus `Retry-After` on a 429).
//!
//! Handlers return `Result<Response, ApiError>`; the mapping from the engine's
//! [`SubmitError`] and from axum's body rejections to statuses lives here so that every
//! endpoint answers the same way.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use myriad_engine_api::SubmitError;
use serde_json::json;

/// An error response.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The error object's `type`.
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Sent as `Retry-After` (whole seconds, rounded up).
    pub retry_after: Option<Duration>,
}

const INVALID: &str = "invalid_request_error";

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 400 about the request as a whole.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID, message)
    }

    /// A 400 about one field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::invalid(message)
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                INVALID,
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, INVALID, message)
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        ApiError {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                INVALID,
                format!("The request body is larger than the limit of {limit} bytes."),
            )
        }
    }

    pub fn route_not_found(method: &str, path: &str) -> Self {
        ApiError {
            code: Some("unknown_url"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                INVALID,
                format!("Unknown request URL: {method} {path}."),
            )
        }
    }

    pub fn overloaded(message: impl Into<String>, retry_after: Duration) -> Self {
        ApiError {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("service_unavailable"),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The request body could not be read: too large (413) or broken off (400).
    pub fn from_body_rejection(rejection: BytesRejection, limit: usize) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::payload_too_large(limit)
        } else {
            Self::invalid(format!("Could not read the request body: {rejection}"))
        }
    }

    /// The error object, also sent as an SSE event when a stream fails after it started.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid(m) | SubmitError::TooLarge(m) => ApiError::invalid(m),
            SubmitError::Overloaded { retry_after, .. } => {
                let message = e.to_string();
                ApiError::overloaded(message, retry_after)
            }
            SubmitError::Stopped => ApiError::unavailable(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, at least 1: a client that retries at once would be refused again.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_errors_map_to_statuses() {
        let e = ApiError::from(SubmitError::Overloaded {
            waiting: 3,
            retry_after: Duration::from_millis(1500),
        });
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            ApiError::from(SubmitError::Stopped).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::from(SubmitError::TooLarge("x".into())).status,
            StatusCode::BAD_REQUEST
        );
        let body = ApiError::invalid_param("n", "bad").body();
        assert_eq!(body["error"]["param"], "n");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["code"].is_null());
    }
}
