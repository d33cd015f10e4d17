//! Request guards: the optional API key and CORS.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::{ApiError, ErrorKind, OllamaError, OpenAiError};
use super::AppState;

/// Paths that never need the key: load balancers and Ollama clients probe them.
const OPEN_PATHS: [&str; 2] = ["/health", "/"];

/// Equal keys, compared in time that does not depend on where they differ (or on their length:
/// both sides are hashed first).
pub fn keys_match(given: &str, expected: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Require `Authorization: Bearer KEY` on every route but the open ones, when a key is set.
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.api_key.as_deref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if OPEN_PATHS.contains(&path) || req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if keys_match(given, expected) {
        return next.run(req).await;
    }
    let err = ApiError::new(
        ErrorKind::Unauthorized,
        "missing or wrong API key: send `Authorization: Bearer KEY`",
    );
    if path.starts_with("/api/") {
        OllamaError(err).into_response()
    } else {
        OpenAiError(err).into_response()
    }
}

/// Answer CORS preflights and tag responses for the configured origins; with no origins
/// configured, nothing is added (browsers then refuse cross-origin calls).
pub async fn cors(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    let allowed = origin.filter(|o| {
        state
            .cors_origins
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(o))
    });
    let Some(origin) = allowed else {
        return next.run(req).await;
    };
    let preflight = req.method() == Method::OPTIONS;
    let mut resp = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, HEAD, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, x-request-id"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::keys_match;

    #[test]
    fn keys_compare_exactly() {
        assert!(keys_match("secret", "secret"));
        assert!(!keys_match("secreT", "secret"));
        assert!(!keys_match("", "secret"));
        assert!(!keys_match("secret-and-more", "secret"));
    }
}
