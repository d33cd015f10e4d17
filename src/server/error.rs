//! API errors: one kind per failure, one place that maps kinds to HTTP status, and the body shape
//! each API's clients expect (OpenAI `{"error": {...}}`, Ollama `{"error": "..."}`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::engine::EngineError;
use crate::registry::RegistryError;

/// What went wrong, in terms a client can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed or out-of-range input (400).
    Invalid,
    /// The body is larger than the limit (413).
    TooLarge,
    /// No or a wrong API key (401).
    Unauthorized,
    /// The model does not exist (404).
    NotFound,
    /// Valid JSON that cannot be processed, e.g. a prompt longer than the context (422).
    Unprocessable,
    /// Too many requests in flight (429, with Retry-After).
    Busy,
    /// Not ready or shutting down (503).
    Unavailable,
    /// A failure on our side (500); the message never carries internal detail.
    Internal,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Invalid,
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Busy => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    fn openai_type(&self) -> &'static str {
        match self.kind {
            ErrorKind::Invalid | ErrorKind::TooLarge | ErrorKind::Unprocessable => {
                "invalid_request_error"
            }
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::Unauthorized => "authentication_error",
            ErrorKind::Busy => "rate_limit_error",
            ErrorKind::Unavailable => "service_unavailable",
            ErrorKind::Internal => "server_error",
        }
    }

    fn with_headers(&self, mut resp: Response) -> Response {
        *resp.status_mut() = self.status();
        if matches!(self.kind, ErrorKind::Busy | ErrorKind::Unavailable) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let kind = match e {
            RegistryError::NotFound { .. } | RegistryError::NotDownloaded { .. } => {
                ErrorKind::NotFound
            }
            RegistryError::Load { .. } => ErrorKind::Internal,
            RegistryError::NoRoom { .. } => ErrorKind::Unavailable,
        };
        let mut err = ApiError::new(kind, e.to_string());
        err.param = Some("model".into());
        err
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::PromptTooLong { .. } => {
                ApiError::new(ErrorKind::Unprocessable, e.to_string())
            }
            EngineError::EmptyPrompt => ApiError::invalid("messages", e.to_string()),
            EngineError::InvalidRequest(m) => ApiError::new(ErrorKind::Invalid, m),
            EngineError::Stopped => {
                ApiError::new(ErrorKind::Unavailable, "the model is unloading; retry")
            }
            other => {
                tracing::error!(error = %other, "request failed");
                ApiError::new(ErrorKind::Internal, "internal error while generating")
            }
        }
    }
}

/// An error rendered the way OpenAI clients expect.
pub struct OpenAiError(pub ApiError);

/// An error rendered the way Ollama clients expect.
pub struct OllamaError(pub ApiError);

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl<E: Into<ApiError>> From<E> for OllamaError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = &self.0;
        let body = json!({"error": {
            "message": e.message,
            "type": e.openai_type(),
            "param": e.param,
            "code": serde_json::Value::Null,
        }});
        e.with_headers(Json(body).into_response())
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let e = &self.0;
        e.with_headers(Json(json!({"error": e.message})).into_response())
    }
}
