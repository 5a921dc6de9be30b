//! API keys: with keys configured, every `/v1` request must carry `Authorization: Bearer KEY`
//! with one of them (a 401 otherwise, as OpenAI answers). `/health` and `/metrics` stay open
//! for load balancers and scrapers, as in vLLM.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::GatewayState;

/// Middleware on the `/v1` routes.
pub(crate) async fn require_key(
    State(state): State<Arc<GatewayState>>,
    request: Request,
    next: Next,
) -> Response {
    match check(&state.config().api_keys, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// Whether `headers` carry one of `keys` as a bearer token (always, when `keys` is empty); the
/// 401 to answer otherwise. The proxy (`crate::proxy`) checks its own keys with this too.
pub(crate) fn check(keys: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    if keys.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    match given {
        None => Err(ApiError::unauthorized(
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )),
        Some(token)
            if keys
                .iter()
                .any(|k| constant_time_eq(k.as_bytes(), token.as_bytes())) =>
        {
            Ok(())
        }
        Some(_) => Err(ApiError::unauthorized("Incorrect API key provided.")),
    }
}

/// The token of `Bearer TOKEN` (the scheme is case-insensitive, RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares without stopping at the first difference, so response timing does not reveal
/// how much of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_tokens() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert!(constant_time_eq(b"key", b"key"));
        assert!(!constant_time_eq(b"key", b"kez"));
        assert!(!constant_time_eq(b"key", b"keys"));
    }
}
